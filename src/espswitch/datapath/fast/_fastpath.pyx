# cython: language_level=3, cdivision=True, embedsignature=True
# cython: boundscheck=True, wraparound=False, initializedcheck=True
"""The compiled ESP core of the fast path (issue 10): per-SA state and per-packet work in C.

Layers, so that a batch loop over ring slots (the later NIC -> TAP pipeline) can call the
same code without the GIL:

- `esp_sa`: one SA as a plain C struct: identity, one OpenSSL EVP cipher context (and one
  EVP_MAC context for HMAC transforms) made once at install, the sequence number, the
  replay window (RFC 4303 §3.4.3, ring of 64-bit blocks as RFC 6479), packet/byte/drop
  counters and the lifetime thresholds the Python slow path computed.
- `esp_seal` / `esp_open`: one packet, `nogil`, on raw buffers with explicit lengths;
  return a next header / 0, or -1-DropReason. They never call Python. When a packet
  crosses a lifetime threshold they set `*account`: the caller must hand up to the
  Python slow path (`_account_slow`) before the next packet of this SA, exactly where the
  Python engine would run it.
- `esp_seal_burst` / `esp_open_burst`: a batch of `esp_pkt` descriptors under the SA's
  mutex, stopping after a packet that needs accounting.
- `SaCore`: the Python-visible owner of one `esp_sa` (thin wrappers: `seal`, `open`, and
  the state the Python SA classes read and write through properties), and the module
  functions `seal_batch` / `open_batch`, which release the GIL around the whole loop.

Threads: each `esp_sa` has a mutex. The bursts hold it for their whole run without the
GIL, the single-packet calls for one packet with the GIL, and every write from Python (the
properties the Python SA's lifetime code uses) takes it too, so a batch on one thread and
Python on another never interleave inside a packet: sequence numbers stay unique and each
packet passes the replay window once. The lifetime hand-up itself runs after the burst
returned (mutex released, GIL held).

Limits: inputs over 1 GiB are refused (a payload: ValueError; a received packet:
malformed), so every length fits OpenSSL's int. Sealing refuses a payload whose
result would not fit the given buffer (ERR_CAPACITY) before it moves any state.

Received bytes are hostile: `esp_open` checks the length against the transform's minimum
and block alignment before it reads any byte, and every later access is inside
[0, len) by construction (the comments at each access say why). Cython's boundscheck
does not apply to the raw pointers used here, so these explicit checks are the bounds
checks. Keys never leave OpenSSL's contexts: the C struct keeps no copy of a key; the
salt and IV mask are cleansed (OPENSSL_cleanse) when the SA is freed.
"""

from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

import weakref

from espswitch.ipsec.errors import DropReason, SaRefused

# -- OpenSSL (libcrypto, EVP only) -------------------------------------------------------------

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_MAC:
        pass
    ctypedef struct EVP_MAC_CTX:
        pass
    ctypedef struct ENGINE:
        pass
    ctypedef struct OSSL_PARAM:
        const char *key
    const EVP_CIPHER *EVP_aes_128_gcm()
    const EVP_CIPHER *EVP_aes_192_gcm()
    const EVP_CIPHER *EVP_aes_256_gcm()
    const EVP_CIPHER *EVP_chacha20_poly1305()
    const EVP_CIPHER *EVP_aes_128_cbc()
    const EVP_CIPHER *EVP_aes_192_cbc()
    const EVP_CIPHER *EVP_aes_256_cbc()
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *outm, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad)
    int EVP_CTRL_AEAD_GET_TAG
    int EVP_CTRL_AEAD_SET_TAG
    EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties)
    void EVP_MAC_free(EVP_MAC *mac)
    EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac)
    void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx)
    int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                     const OSSL_PARAM *params)
    int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen)
    int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize)

cdef extern from "openssl/params.h" nogil:
    OSSL_PARAM OSSL_PARAM_construct_utf8_string(const char *key, char *buf, size_t bsize)
    OSSL_PARAM OSSL_PARAM_construct_end()

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)
    int CRYPTO_memcmp(const void *a, const void *b, size_t len)

cdef extern from "openssl/rand.h" nogil:
    int RAND_bytes(unsigned char *buf, int num)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "Python.h":
    # Raw-pointer forms, for building a result bytes object in place and shrinking it.
    PyObject *_bytes_new "PyBytes_FromStringAndSize"(const char *s, Py_ssize_t n)
    char *_bytes_buf "PyBytes_AS_STRING"(PyObject *o)
    int _PyBytes_Resize(PyObject **pv, Py_ssize_t n)
    void _decref "Py_DECREF"(PyObject *o)
    int PyObject_GetBuffer(object obj, Py_buffer *view, int flags) except -1
    void PyBuffer_Release(Py_buffer *view)
    int PyBUF_SIMPLE
    int PyBUF_WRITABLE

# -- constants ---------------------------------------------------------------------------------

cdef enum:
    CIPHER_GCM = 1
    CIPHER_CHACHA = 2
    CIPHER_CBC = 3
    CIPHER_NULL = 4

cdef enum:
    MAC_NONE = 0
    MAC_SHA256 = 1
    MAC_SHA1 = 2

# DropReason values (espswitch/ipsec/errors.py); a C function returns -1 - reason.
cdef enum:
    R_UNKNOWN_SPI = 0
    R_REPLAYED = 1
    R_TOO_OLD = 2
    R_AUTH_FAILED = 3
    R_BAD_PADDING = 4
    R_MALFORMED = 5
    R_EXPIRED = 6
    R_SEQ_EXHAUSTED = 7
    R_DUMMY = 8
    N_REASONS = 9

# Results that are not drops of a packet: the caller's mistake or a library failure.
cdef enum:
    ERR_CAPACITY = -100  # the output buffer is too small
    ERR_CRYPTO = -101    # OpenSSL refused a call it should not refuse

cdef extern from *:
    """
    #include <stdint.h>
    #define ESP_NH_DUMMY 59
    #define ESP_MAX_PACKET ((size_t)1 << 30)
    #define ESP_U64_MAX UINT64_MAX
    #define ESP_ESN_GUESS_WINDOW ((uint64_t)1 << 31)
    #define ESP_MAX_WINDOW ((uint64_t)1 << 20)
    #define ESP_LOW32 ((uint64_t)0xFFFFFFFFu)
    """
    # RFC 4303 §2.6: next header 59 marks a dummy packet.
    const int NH_DUMMY "ESP_NH_DUMMY"
    # Larger inputs are refused before any length reaches an OpenSSL int.
    const size_t MAX_PACKET "ESP_MAX_PACKET"
    const uint64_t U64_MAX "ESP_U64_MAX"
    # With the replay check off, ESN inference uses a half-space window (replay.py).
    const uint64_t ESN_GUESS_WINDOW "ESP_ESN_GUESS_WINDOW"
    const uint64_t MAX_WINDOW "ESP_MAX_WINDOW"
    const uint64_t LOW32 "ESP_LOW32"

cdef extern from *:
    """
    #ifndef ESP_SOURCE_SHA256
    #define ESP_SOURCE_SHA256 ""
    #endif
    """
    const char *ESP_SOURCE_SHA256

SOURCE_SHA256 = ESP_SOURCE_SHA256.decode()
"""The SHA-256 of the .pyx this module was built from ("" when setup.py did not say)."""

_REASONS = tuple(DropReason)
assert [int(r) for r in _REASONS] == list(range(N_REASONS)), "DropReason changed: update _fastpath"

# -- the SA as a C struct ----------------------------------------------------------------------

cdef struct esp_window:
    uint64_t top
    uint64_t *blocks
    uint64_t nblocks
    uint64_t bmask
    uint64_t size
    int esn

cdef struct esp_sa:
    uint32_t spi
    int outbound
    int cipher
    int mac_kind
    int esn
    int iv_len
    int icv_len
    int block_size  # a power of two: 4 or 16
    int fixed       # 8 + iv_len + icv_len
    int min_len     # fixed + max(block_size, 4)
    uint8_t salt[4]
    uint64_t iv_mask
    EVP_CIPHER_CTX *ctx
    EVP_MAC_CTX *mac
    uint64_t packets
    uint64_t bytes
    uint64_t drops[N_REASONS]
    int expired
    uint64_t bytes_check    # U64_MAX: no byte limit pending
    uint64_t seq            # outbound: the last sequence number sent
    uint64_t seq_limit      # outbound: the highest sequence number it may send
    uint64_t check_seq      # outbound: where a packet lifetime is crossed; 0: none
    uint64_t check_packets  # inbound: packet count where a lifetime is crossed; U64_MAX: none
    esp_window win
    pthread_mutex_t lock

cdef struct esp_pkt:
    # One packet of a burst. `data`/`len` is the input, `out`/`cap` where the result goes.
    const uint8_t *data
    size_t len
    uint8_t *out
    size_t cap
    size_t out_len
    const uint8_t *iv   # outbound: an IV to use instead of the default (tests), or NULL
    int nh              # outbound: the next header to seal with
    int result          # seal: 0; open: the next header; or -1 - DropReason, or ERR_*
    uint64_t seq        # the full sequence number of the packet (after seal / open)

# -- byte helpers ------------------------------------------------------------------------------

cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v

cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>v)

cdef inline size_t pad_len(const esp_sa *sa, size_t n) noexcept nogil:
    # RFC 4303 §2.4: payload + padding + pad length + next header fills whole blocks.
    return (<size_t>0 - (n + 2)) & <size_t>(sa.block_size - 1)

cdef inline size_t esp_sealed_len(const esp_sa *sa, size_t n) noexcept nogil:
    """The length of the ESP packet that sealing `n` payload bytes makes."""
    return 8 + sa.iv_len + n + pad_len(sa, n) + 2 + sa.icv_len

cdef inline size_t open_capacity(const esp_sa *sa, size_t n) noexcept nogil:
    """The output room `esp_open` needs for an `n`-byte packet: 0 for one whose length
    alone makes it malformed (esp_open then drops it before it writes anything)."""
    if n < <size_t>sa.min_len or n > MAX_PACKET:
        return 0
    return n - sa.fixed

# -- the replay window (RFC 4303 §3.4.3 and Appendix A) ----------------------------------------

cdef inline int win_infer(const esp_window *w, uint32_t low, uint64_t *seq) noexcept nogil:
    """The full sequence number of a received low half; 0 when it would fall outside
    0..2^64-1 (the Python engine's -1, reported as too old)."""
    cdef uint64_t th, tl, ww, sh
    if not w.esn:
        seq[0] = low
        return 1
    th = w.top >> 32
    tl = w.top & LOW32
    ww = w.size if w.size else ESN_GUESS_WINDOW
    if tl >= ww - 1:
        if low >= tl - ww + 1:
            sh = th
        else:
            if th == LOW32:
                return 0
            sh = th + 1
    else:
        if low >= ((tl - ww + 1) & LOW32):
            if th == 0:
                return 0
            sh = th - 1
        else:
            sh = th
    seq[0] = (sh << 32) | low
    return 1

cdef inline int win_check(const esp_window *w, uint64_t seq) noexcept nogil:
    """-1 when `seq` may be new, else the DropReason (REPLAYED or TOO_OLD)."""
    if seq > w.top or not w.size:
        return -1
    if w.top - seq >= w.size:
        return R_TOO_OLD
    # bmask < nblocks: the index is inside the array.
    if (w.blocks[(seq >> 6) & w.bmask] >> (seq & 63)) & 1:
        return R_REPLAYED
    return -1

cdef inline void win_update(esp_window *w, uint64_t seq) noexcept nogil:
    """Record an authenticated `seq`; only the blocks that come into view are cleared."""
    cdef uint64_t gap, b
    if seq > w.top:
        gap = (seq >> 6) - (w.top >> 6)
        if gap:
            if gap >= w.nblocks:
                memset(w.blocks, 0, w.nblocks * sizeof(uint64_t))
            else:
                b = (w.top >> 6) + 1
                while b <= (seq >> 6):
                    w.blocks[b & w.bmask] = 0
                    b += 1
        w.top = seq
    w.blocks[(seq >> 6) & w.bmask] |= (<uint64_t>1) << (seq & 63)

# -- one packet --------------------------------------------------------------------------------

cdef inline int drop(esp_sa *sa, int reason) noexcept nogil:
    sa.drops[reason] += 1
    return -1 - reason

cdef int esp_seal(esp_sa *sa, const uint8_t *payload, size_t n, int nh, const uint8_t *iv,
                  uint8_t *out, size_t cap, size_t *out_len, uint64_t *seq_out,
                  int *account) noexcept nogil:
    """Seal `n` payload bytes into `out` (the ESP packet from the SPI to the ICV).

    Returns 0, -1-EXPIRED / -1-SEQ_EXHAUSTED when the SA may not send (counted), or ERR_*.
    The caller holds sa.lock. `iv` (iv_len bytes) replaces the default IV when not NULL.
    """
    cdef uint64_t seq
    cdef size_t pad, total, ptlen, i, off
    cdef uint8_t trailer[18]
    cdef uint8_t nonce[12]
    cdef uint8_t aad[12]
    cdef uint8_t mac[64]
    cdef size_t maclen = 0
    cdef int l = 0, aadlen
    cdef uint8_t *ct
    account[0] = 0
    if sa.seq >= sa.seq_limit:
        # Past a hard lifetime the SA is expired; otherwise the sequence space ran out.
        return drop(sa, R_EXPIRED if sa.expired else R_SEQ_EXHAUSTED)
    if n > MAX_PACKET:
        return ERR_CAPACITY
    pad = pad_len(sa, n)
    total = 8 + sa.iv_len + n + pad + 2 + sa.icv_len
    if cap < total:
        return ERR_CAPACITY
    seq = sa.seq + 1
    ptlen = n + pad + 2
    for i in range(pad):
        trailer[i] = <uint8_t>(i + 1)
    trailer[pad] = <uint8_t>pad
    trailer[pad + 1] = <uint8_t>nh
    put32(out, sa.spi)
    put32(out + 4, <uint32_t>seq)
    ct = out + 8 + sa.iv_len
    if sa.cipher == CIPHER_GCM or sa.cipher == CIPHER_CHACHA:
        if iv != NULL:
            memcpy(out + 8, iv, 8)
        else:
            # RFC 4106 §3.1: unique per key; seq XOR a per-SA random mask, as the Python SA.
            put64(out + 8, seq ^ sa.iv_mask)
        memcpy(nonce, sa.salt, 4)
        memcpy(nonce + 4, out + 8, 8)
        if sa.esn:
            put32(aad, sa.spi)
            put32(aad + 4, <uint32_t>(seq >> 32))
            put32(aad + 8, <uint32_t>seq)
            aadlen = 12
        else:
            memcpy(aad, out, 8)
            aadlen = 8
        if EVP_CipherInit_ex(sa.ctx, NULL, NULL, NULL, nonce, 1) != 1:
            return ERR_CRYPTO
        if EVP_CipherUpdate(sa.ctx, NULL, &l, aad, aadlen) != 1:
            return ERR_CRYPTO
        if n and EVP_CipherUpdate(sa.ctx, ct, &l, payload, <int>n) != 1:
            return ERR_CRYPTO
        if EVP_CipherUpdate(sa.ctx, ct + n, &l, trailer, <int>(pad + 2)) != 1:
            return ERR_CRYPTO
        if EVP_CipherFinal_ex(sa.ctx, ct + ptlen, &l) != 1:
            return ERR_CRYPTO
        if EVP_CIPHER_CTX_ctrl(sa.ctx, EVP_CTRL_AEAD_GET_TAG, 16, ct + ptlen) != 1:
            return ERR_CRYPTO
    else:
        if sa.cipher == CIPHER_CBC:
            # RFC 3602: the CBC IV must be unpredictable, so it is random.
            if iv != NULL:
                memcpy(out + 8, iv, 16)
            elif RAND_bytes(out + 8, 16) != 1:
                return ERR_CRYPTO
            if EVP_CipherInit_ex(sa.ctx, NULL, NULL, NULL, out + 8, 1) != 1:
                return ERR_CRYPTO
            off = 0
            if n:
                if EVP_CipherUpdate(sa.ctx, ct, &l, payload, <int>n) != 1:
                    return ERR_CRYPTO
                off = <size_t>l
            if EVP_CipherUpdate(sa.ctx, ct + off, &l, trailer, <int>(pad + 2)) != 1:
                return ERR_CRYPTO
            off += <size_t>l
            if EVP_CipherFinal_ex(sa.ctx, ct + off, &l) != 1:
                return ERR_CRYPTO
            if off + <size_t>l != ptlen:
                return ERR_CRYPTO
        else:
            if n and ct != payload:   # the transmit pipeline seals in place
                memcpy(ct, payload, n)
            memcpy(ct + n, trailer, pad + 2)
        # Encrypt, then MAC over the header, IV and ciphertext (RFC 4303 §3.3.2.1).
        if EVP_MAC_init(sa.mac, NULL, 0, NULL) != 1:
            return ERR_CRYPTO
        if EVP_MAC_update(sa.mac, out, 8 + sa.iv_len + ptlen) != 1:
            return ERR_CRYPTO
        if sa.esn:
            # RFC 4303 §2.2.1: the high half is authenticated as if it followed the trailer.
            put32(aad, <uint32_t>(seq >> 32))
            if EVP_MAC_update(sa.mac, aad, 4) != 1:
                return ERR_CRYPTO
        if EVP_MAC_final(sa.mac, mac, &maclen, 64) != 1 or maclen < <size_t>sa.icv_len:
            return ERR_CRYPTO
        memcpy(ct + ptlen, mac, sa.icv_len)
        OPENSSL_cleanse(mac, 64)
    # Committed only now: a library failure above sends nothing and moves nothing.
    sa.seq = seq
    sa.packets += 1
    sa.bytes += n
    out_len[0] = total
    seq_out[0] = seq
    if seq == sa.check_seq or sa.bytes >= sa.bytes_check:
        account[0] = 1
    return 0

cdef int esp_open(esp_sa *sa, const uint8_t *esp, size_t n, uint8_t *out, size_t cap,
                  size_t *out_len, uint64_t *seq_out, int *account) noexcept nogil:
    """Check and open one received ESP packet `esp[0:n]`; the payload goes to `out`.

    Returns the next header (the payload is out[0:*out_len]) or -1-DropReason (counted),
    in the Python engine's order: length, lifetime, replay window, ICV, padding; the
    window moves only after the ICV verified. ERR_* for a too-small `out`.
    The caller holds sa.lock. `cap` must be at least n - sa.fixed.
    """
    cdef uint64_t seq = 0
    cdef size_t ctlen, end_icv
    cdef int64_t end
    cdef int reason, l = 0, l2 = 0, aadlen, pad, i, nh
    cdef uint8_t nonce[12]
    cdef uint8_t aad[12]
    cdef uint8_t tag[16]
    cdef uint8_t mac[64]
    cdef size_t maclen = 0
    cdef size_t ptlen
    account[0] = 0
    # Every read below is inside esp[0:n] because n >= min_len = 8 + iv + icv + 4 (or a
    # whole block), and the ciphertext is what lies between the IV and the ICV.
    if n < <size_t>sa.min_len or n > MAX_PACKET or (n - sa.fixed) & (sa.block_size - 1):
        return drop(sa, R_MALFORMED)
    if sa.expired:
        return drop(sa, R_EXPIRED)
    if not win_infer(&sa.win, get32(esp + 4), &seq):
        return drop(sa, R_TOO_OLD)
    if seq <= sa.win.top:
        reason = win_check(&sa.win, seq)
        if reason >= 0:
            return drop(sa, reason)
    ctlen = n - sa.fixed
    if cap < ctlen:
        return ERR_CAPACITY
    if sa.esn:
        put32(aad, sa.spi)
        put32(aad + 4, <uint32_t>(seq >> 32))
        put32(aad + 8, <uint32_t>seq)
        aadlen = 12
    else:
        memcpy(aad, esp, 8)
        aadlen = 8
    if sa.cipher == CIPHER_GCM or sa.cipher == CIPHER_CHACHA:
        memcpy(nonce, sa.salt, 4)
        memcpy(nonce + 4, esp + 8, 8)
        memcpy(tag, esp + n - 16, 16)  # n >= 36: the tag is the last 16 bytes
        if EVP_CipherInit_ex(sa.ctx, NULL, NULL, NULL, nonce, 0) != 1:
            return ERR_CRYPTO
        if EVP_CipherUpdate(sa.ctx, NULL, &l, aad, aadlen) != 1:
            return ERR_CRYPTO
        if EVP_CipherUpdate(sa.ctx, out, &l, esp + 16, <int>ctlen) != 1:
            return ERR_CRYPTO
        if EVP_CIPHER_CTX_ctrl(sa.ctx, EVP_CTRL_AEAD_SET_TAG, 16, tag) != 1:
            return ERR_CRYPTO
        if EVP_CipherFinal_ex(sa.ctx, out + l, &l2) <= 0:
            return drop(sa, R_AUTH_FAILED)
        ptlen = ctlen
    else:
        # Verify the HMAC first: nothing is decrypted from a forged packet.
        end_icv = n - sa.icv_len
        if EVP_MAC_init(sa.mac, NULL, 0, NULL) != 1:
            return ERR_CRYPTO
        if EVP_MAC_update(sa.mac, esp, end_icv) != 1:
            return ERR_CRYPTO
        if sa.esn:
            put32(aad, <uint32_t>(seq >> 32))
            if EVP_MAC_update(sa.mac, aad, 4) != 1:
                return ERR_CRYPTO
        if EVP_MAC_final(sa.mac, mac, &maclen, 64) != 1 or maclen < <size_t>sa.icv_len:
            return ERR_CRYPTO
        if CRYPTO_memcmp(mac, esp + end_icv, sa.icv_len) != 0:
            return drop(sa, R_AUTH_FAILED)
        if sa.cipher == CIPHER_CBC:
            # The IV is esp[8:24]; the ciphertext esp[24:end_icv] is whole blocks (checked).
            if EVP_CipherInit_ex(sa.ctx, NULL, NULL, NULL, esp + 8, 0) != 1:
                return ERR_CRYPTO
            if EVP_CipherUpdate(sa.ctx, out, &l, esp + 24, <int>ctlen) != 1:
                return ERR_CRYPTO
            if EVP_CipherFinal_ex(sa.ctx, out + l, &l2) != 1 or <size_t>(l + l2) != ctlen:
                return ERR_CRYPTO
        else:
            memcpy(out, esp + 8, ctlen)
        ptlen = ctlen
    # ptlen >= 4 (min_len): pt[ptlen-2] and pt[ptlen-1] are inside out[0:ptlen].
    pad = out[ptlen - 2]
    end = <int64_t>ptlen - 2 - pad
    if end < 0:
        return drop(sa, R_BAD_PADDING)
    # end >= 0 and end + pad = ptlen - 2: the padding bytes are inside out[0:ptlen].
    for i in range(pad):
        if out[end + i] != <uint8_t>(i + 1):
            return drop(sa, R_BAD_PADDING)
    win_update(&sa.win, seq)
    sa.packets += 1
    sa.bytes += <uint64_t>end
    seq_out[0] = seq
    if sa.packets >= sa.check_packets or sa.bytes >= sa.bytes_check:
        account[0] = 1
    nh = out[ptlen - 1]
    if nh == NH_DUMMY:
        return drop(sa, R_DUMMY)
    out_len[0] = <size_t>end
    return nh

# -- bursts ------------------------------------------------------------------------------------

cdef Py_ssize_t esp_seal_burst(esp_sa *sa, esp_pkt *pkts, Py_ssize_t start,
                               Py_ssize_t count, int *account_out) noexcept nogil:
    """Seal pkts[start:count] under the SA's lock. Returns the index after the last packet
    done; `*account_out` is set when that packet crossed a lifetime threshold (the caller
    runs the slow-path accounting with its `seq`, then calls again from there)."""
    cdef Py_ssize_t i
    cdef int account = 0
    pthread_mutex_lock(&sa.lock)
    i = start
    while i < count:
        pkts[i].result = esp_seal(sa, pkts[i].data, pkts[i].len, pkts[i].nh, pkts[i].iv,
                                  pkts[i].out, pkts[i].cap, &pkts[i].out_len, &pkts[i].seq,
                                  &account)
        i += 1
        if account:
            break
    pthread_mutex_unlock(&sa.lock)
    account_out[0] = account
    return i

cdef Py_ssize_t esp_open_burst(esp_sa *sa, esp_pkt *pkts, Py_ssize_t start,
                               Py_ssize_t count, int *account_out) noexcept nogil:
    """Open pkts[start:count] under the SA's lock; stops as `esp_seal_burst` does."""
    cdef Py_ssize_t i
    cdef int account = 0
    pthread_mutex_lock(&sa.lock)
    i = start
    while i < count:
        pkts[i].result = esp_open(sa, pkts[i].data, pkts[i].len, pkts[i].out, pkts[i].cap,
                                  &pkts[i].out_len, &pkts[i].seq, &account)
        i += 1
        if account:
            break
    pthread_mutex_unlock(&sa.lock)
    account_out[0] = account
    return i

# -- the Python-visible SA core ----------------------------------------------------------------

_CIPHERS = {"aes-gcm": CIPHER_GCM, "chacha20-poly1305": CIPHER_CHACHA,
            "aes-cbc": CIPHER_CBC, "null": CIPHER_NULL}
_MACS = {"aead": MAC_NONE, "hmac-sha256": MAC_SHA256, "hmac-sha1": MAC_SHA1}


def supports(transform) -> bool:
    """Whether the compiled core implements this `Transform` (its cipher, integrity and
    key length)."""
    if transform.cipher not in _CIPHERS or transform.integrity not in _MACS:
        return False
    if transform.cipher == "aes-gcm" or transform.cipher == "aes-cbc":
        return transform.enc_key_len in (16, 24, 32)
    if transform.cipher == "chacha20-poly1305":
        return transform.enc_key_len == 32
    return transform.enc_key_len == 0


cdef const EVP_CIPHER *_evp_cipher(int cipher, int key_len) noexcept:
    if cipher == CIPHER_GCM:
        return (EVP_aes_128_gcm() if key_len == 16 else
                EVP_aes_192_gcm() if key_len == 24 else EVP_aes_256_gcm())
    if cipher == CIPHER_CHACHA:
        return EVP_chacha20_poly1305()
    if cipher == CIPHER_CBC:
        return (EVP_aes_128_cbc() if key_len == 16 else
                EVP_aes_192_cbc() if key_len == 24 else EVP_aes_256_cbc())
    return NULL


cdef class SaCore:
    """One SA's state and crypto contexts, in C; the per-packet entry points `seal` and
    `open`. The Python SA classes of `espswitch.datapath.fast.sa` keep their state here
    (through properties), so one SA has one state whichever path handles a packet."""

    cdef esp_sa sa
    cdef bint _ready
    cdef object _owner       # weakref to the Python SA, for the slow-path accounting
    cdef object _iv_source   # None, or seq -> IV bytes (known-answer and differential tests)

    def __cinit__(self):
        memset(&self.sa, 0, sizeof(esp_sa))
        pthread_mutex_init(&self.sa.lock, NULL)
        self._ready = False

    def __init__(self, transform, keymat, *, spi, bint outbound,
                 owner=None, iv_source=None):
        """Make the contexts for `transform` (an `espswitch.ipsec.Transform`) with the
        KEYMAT `keymat` (encryption key, salt, integrity key; RFC 7296 order)."""
        cdef const unsigned char *k
        cdef Py_ssize_t ek, sl, ik
        cdef const EVP_CIPHER *evp
        cdef EVP_MAC *mac_algo
        cdef OSSL_PARAM params[2]
        cdef bytes digest
        if self._ready:
            raise RuntimeError("SaCore is initialised once")
        if not supports(transform):
            raise ValueError(f"the compiled fast path does not support {transform.name}")
        km = bytes(keymat)
        ek, sl, ik = transform.enc_key_len, transform.salt_len, transform.integ_key_len
        if len(km) != ek + sl + ik:
            raise ValueError(f"{transform.name} needs {ek + sl + ik} bytes of keying material")
        if not 0 <= spi <= 0xFFFFFFFF:
            raise ValueError("SPI must be a 32-bit number")
        if sl not in (0, 4):
            raise ValueError("unexpected salt length")
        k = km
        self.sa.spi = <uint32_t>spi
        self.sa.outbound = outbound
        self.sa.cipher = _CIPHERS[transform.cipher]
        self.sa.mac_kind = _MACS[transform.integrity]
        self.sa.esn = transform.esn
        self.sa.iv_len = transform.iv_len
        self.sa.icv_len = transform.icv_len
        self.sa.block_size = transform.block_size
        if self.sa.block_size not in (4, 16) or self.sa.icv_len > 64:
            raise ValueError("unexpected transform geometry")
        self.sa.fixed = 8 + self.sa.iv_len + self.sa.icv_len
        self.sa.min_len = self.sa.fixed + max(self.sa.block_size, 4)
        if sl:
            memcpy(self.sa.salt, k + ek, 4)
        self.sa.seq_limit = 0
        self.sa.bytes_check = U64_MAX
        self.sa.check_packets = U64_MAX
        evp = _evp_cipher(self.sa.cipher, <int>ek)
        if evp != NULL:
            self.sa.ctx = EVP_CIPHER_CTX_new()
            if self.sa.ctx == NULL:
                raise MemoryError()
            # The key is set once here; per packet only the IV/nonce changes.
            if EVP_CipherInit_ex(self.sa.ctx, evp, NULL, k, NULL, 1 if outbound else 0) != 1:
                raise ValueError("OpenSSL refused the cipher key")
            if self.sa.cipher == CIPHER_CBC:
                # ESP pads itself (RFC 4303 §2.4): no PKCS#7 padding from OpenSSL.
                EVP_CIPHER_CTX_set_padding(self.sa.ctx, 0)
        if self.sa.mac_kind != MAC_NONE:
            mac_algo = EVP_MAC_fetch(NULL, b"HMAC", NULL)
            if mac_algo == NULL:
                raise ValueError("OpenSSL has no HMAC")
            self.sa.mac = EVP_MAC_CTX_new(mac_algo)
            EVP_MAC_free(mac_algo)  # the context keeps its own reference
            if self.sa.mac == NULL:
                raise MemoryError()
            digest = b"SHA256" if self.sa.mac_kind == MAC_SHA256 else b"SHA1"
            params[0] = OSSL_PARAM_construct_utf8_string(b"digest", <char *>digest, 0)
            params[1] = OSSL_PARAM_construct_end()
            if EVP_MAC_init(self.sa.mac, k + ek + sl, <size_t>ik, params) != 1:
                raise ValueError("OpenSSL refused the integrity key")
        self._owner = weakref.ref(owner) if owner is not None else None
        # Null encryption has no IV: the Python SA ignores an IV source there too.
        self._iv_source = iv_source if self.sa.iv_len else None
        # A default window until the owner installs its own (see load_window).
        self._alloc_window(0, transform.esn, 0, [1])
        self._ready = True

    def __dealloc__(self):
        if self.sa.ctx != NULL:
            EVP_CIPHER_CTX_free(self.sa.ctx)  # cleanses the key schedule
        if self.sa.mac != NULL:
            EVP_MAC_CTX_free(self.sa.mac)     # cleanses the HMAC key state
        if self.sa.win.blocks != NULL:
            free(self.sa.win.blocks)
        pthread_mutex_destroy(&self.sa.lock)
        OPENSSL_cleanse(&self.sa, sizeof(esp_sa))

    def __repr__(self) -> str:
        return f"<SaCore spi=0x{self.sa.spi:08x} {'out' if self.sa.outbound else 'in'}>"

    def __reduce__(self):
        raise TypeError("an SA core cannot be copied or pickled")

    # -- per packet ----------------------------------------------------------------------

    cdef inline void _check_ready(self) except *:
        if not self._ready:
            raise RuntimeError("SaCore used before it was initialised")

    def seal(self, payload, int next_header):
        """`OutboundSA.encrypt`: the ESP packet from the SPI to the ICV, as bytes.

        Raises SaRefused (counted) when the SA may not send."""
        cdef Py_buffer view
        cdef PyObject *raw
        cdef size_t out_len = 0
        cdef uint64_t seq = 0
        cdef int account = 0, r
        cdef const uint8_t *iv = NULL
        cdef bytes ivb
        self._check_ready()
        if not self.sa.outbound:
            raise TypeError("seal needs an outbound SA")
        if not 0 <= next_header <= 255:
            raise ValueError("next header must be 0 to 255")
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            if <size_t>view.len > MAX_PACKET:
                raise ValueError("payload too large")
            if self._iv_source is not None and self.sa.seq < self.sa.seq_limit:
                ivb = bytes(self._iv_source(self.sa.seq + 1))
                if len(ivb) != self.sa.iv_len:
                    raise ValueError("iv_source returned an IV of the wrong length")
                iv = <const uint8_t *><const char *>ivb
            raw = _bytes_new(NULL, <Py_ssize_t>esp_sealed_len(&self.sa, <size_t>view.len))
            if raw == NULL:
                raise MemoryError()
            pthread_mutex_lock(&self.sa.lock)
            r = esp_seal(&self.sa, <const uint8_t *>view.buf, <size_t>view.len, next_header,
                         iv, <uint8_t *>_bytes_buf(raw),
                         <size_t>esp_sealed_len(&self.sa, <size_t>view.len), &out_len, &seq,
                         &account)
            pthread_mutex_unlock(&self.sa.lock)
        finally:
            PyBuffer_Release(&view)
        if r != 0:
            _decref(raw)
            if r <= ERR_CAPACITY:
                raise RuntimeError("OpenSSL failed to seal a packet")
            raise SaRefused(_REASONS[-1 - r])
        out = <object>raw
        _decref(raw)
        if account:
            self._account(seq)
        return out

    def open(self, esp):
        """`InboundSA.open`: `(next_header, payload)`, or the DropReason it counted."""
        cdef Py_buffer view
        cdef PyObject *raw
        cdef size_t out_len = 0, cap
        cdef uint64_t seq = 0
        cdef int account = 0, r
        self._check_ready()
        if self.sa.outbound:
            raise TypeError("open needs an inbound SA")
        PyObject_GetBuffer(esp, &view, PyBUF_SIMPLE)
        try:
            # Nothing is allocated for what esp_open will call malformed by its length.
            cap = open_capacity(&self.sa, <size_t>view.len)
            raw = _bytes_new(NULL, <Py_ssize_t>cap)
            if raw == NULL:
                raise MemoryError()
            pthread_mutex_lock(&self.sa.lock)
            r = esp_open(&self.sa, <const uint8_t *>view.buf, <size_t>view.len,
                         <uint8_t *>_bytes_buf(raw), cap, &out_len, &seq, &account)
            pthread_mutex_unlock(&self.sa.lock)
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            _decref(raw)
            if r <= ERR_CAPACITY:
                raise RuntimeError("OpenSSL failed to open a packet")
            if account:
                self._account(seq)
            return _REASONS[-1 - r]
        if _PyBytes_Resize(&raw, <Py_ssize_t>out_len) < 0:
            raise MemoryError()
        out = <object>raw
        _decref(raw)
        if account:
            self._account(seq)
        return r, out

    cdef _account(self, uint64_t seq):
        """Hand up to the Python slow path: a packet crossed a lifetime threshold."""
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            return
        if self.sa.outbound:
            owner._account_slow(seq)
        else:
            owner._account_slow()

    # -- the state the Python SA classes read and write ---------------------------------------
    # Writes take the SA's lock: a batch may be running on another thread without the GIL.

    @property
    def spi(self) -> int:
        return self.sa.spi

    @property
    def outbound(self) -> bool:
        return bool(self.sa.outbound)

    @property
    def packets(self) -> int:
        return self.sa.packets

    @packets.setter
    def packets(self, uint64_t v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.packets = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def bytes(self) -> int:
        return self.sa.bytes

    @bytes.setter
    def bytes(self, uint64_t v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.bytes = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def expired(self) -> bool:
        return bool(self.sa.expired)

    @expired.setter
    def expired(self, bint v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.expired = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def seq(self) -> int:
        return self.sa.seq

    @seq.setter
    def seq(self, uint64_t v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.seq = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def seq_limit(self) -> int:
        return self.sa.seq_limit

    @seq_limit.setter
    def seq_limit(self, uint64_t v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.seq_limit = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def check_seq(self) -> int:
        """The Python SA's `_check_seq`: -1 for none."""
        return -1 if self.sa.check_seq == 0 else self.sa.check_seq

    @check_seq.setter
    def check_seq(self, v):
        # Sequence numbers start at 1, so 0 can stand for "none"; a value past the
        # 64-bit space is never reached, so it is "none" too.
        cdef uint64_t c = 0 if v < 0 or v > U64_MAX else v
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.check_seq = c
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def bytes_check(self):
        """The Python SA's `_bytes_check`: math.inf for none."""
        return float("inf") if self.sa.bytes_check == U64_MAX else self.sa.bytes_check

    @bytes_check.setter
    def bytes_check(self, v):
        cdef uint64_t c = U64_MAX if v >= U64_MAX else <uint64_t>max(v, 0)
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.bytes_check = c
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def check_packets(self):
        """The Python SA's `_check_packets`: math.inf for none."""
        return float("inf") if self.sa.check_packets == U64_MAX else self.sa.check_packets

    @check_packets.setter
    def check_packets(self, v):
        cdef uint64_t c = U64_MAX if v >= U64_MAX else <uint64_t>max(v, 0)
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.check_packets = c
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def iv_mask(self) -> int:
        return self.sa.iv_mask

    @iv_mask.setter
    def iv_mask(self, uint64_t v):
        self.sa.iv_mask = v

    def drop_count(self, int reason) -> int:
        if not 0 <= reason < N_REASONS:
            raise IndexError(reason)
        return self.sa.drops[reason]

    def set_drop_count(self, int reason, uint64_t value) -> None:
        if not 0 <= reason < N_REASONS:
            raise IndexError(reason)
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.drops[reason] = value
            pthread_mutex_unlock(&self.sa.lock)

    def drop_counts(self) -> list:
        return [self.sa.drops[i] for i in range(N_REASONS)]

    # -- the replay window ------------------------------------------------------------------

    cdef _alloc_window(self, uint64_t size, bint esn, uint64_t top, blocks):
        cdef Py_ssize_t nb = len(blocks), i
        cdef uint64_t *mem
        if nb < 2 and size:
            raise ValueError("replay window needs at least two blocks")
        if nb < 1 or nb & (nb - 1) or size > MAX_WINDOW or <uint64_t>(nb - 1) * 64 < size:
            raise ValueError("replay window blocks must be a power of two covering the size")
        mem = <uint64_t *>calloc(nb, sizeof(uint64_t))
        if mem == NULL:
            raise MemoryError()
        for i in range(nb):
            mem[i] = blocks[i]
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            if self.sa.win.blocks != NULL:
                free(self.sa.win.blocks)
            self.sa.win.blocks = mem
            self.sa.win.nblocks = <uint64_t>nb
            self.sa.win.bmask = <uint64_t>(nb - 1)
            self.sa.win.size = size
            self.sa.win.esn = esn
            self.sa.win.top = top
            pthread_mutex_unlock(&self.sa.lock)

    def load_window(self, window) -> None:
        """Take the whole state of an `espswitch.ipsec.replay.ReplayWindow`."""
        self._alloc_window(window.size, window.esn, window.top, window.blocks)

    @property
    def win_top(self) -> int:
        return self.sa.win.top

    @win_top.setter
    def win_top(self, uint64_t v):
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.win.top = v
            pthread_mutex_unlock(&self.sa.lock)

    @property
    def win_size(self) -> int:
        return self.sa.win.size

    @property
    def win_esn(self) -> bool:
        return bool(self.sa.win.esn)

    @property
    def win_nblocks(self) -> int:
        return self.sa.win.nblocks

    def win_block(self, Py_ssize_t i) -> int:
        if not 0 <= i < <Py_ssize_t>self.sa.win.nblocks:
            raise IndexError(i)
        return self.sa.win.blocks[i]

    def set_win_block(self, Py_ssize_t i, uint64_t v) -> None:
        if not 0 <= i < <Py_ssize_t>self.sa.win.nblocks:
            raise IndexError(i)
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            self.sa.win.blocks[i] = v
            pthread_mutex_unlock(&self.sa.lock)

    def win_blocks(self) -> list:
        return [self.sa.win.blocks[i] for i in range(self.sa.win.nblocks)]

    def win_infer(self, uint32_t seq_low) -> int:
        """`ReplayWindow.infer`: -1 when the guess falls outside the 64-bit space."""
        cdef uint64_t seq = 0
        if not win_infer(&self.sa.win, seq_low, &seq):
            return -1
        return seq

    def win_check(self, seq):
        """`ReplayWindow.check`: None, or the DropReason."""
        cdef int r
        if seq < 0:
            return _REASONS[R_TOO_OLD]
        if seq > U64_MAX:
            return None
        r = win_check(&self.sa.win, <uint64_t>seq)
        return None if r < 0 else _REASONS[r]

    def win_update(self, uint64_t seq) -> None:
        """`ReplayWindow.update`."""
        with nogil:
            pthread_mutex_lock(&self.sa.lock)
            win_update(&self.sa.win, seq)
            pthread_mutex_unlock(&self.sa.lock)

# -- batches -----------------------------------------------------------------------------------

cdef class _Burst:
    """One batch call's descriptors, input buffer views and output objects (owned
    references, or NULL), released whatever happens."""
    cdef esp_pkt *pkts
    cdef Py_buffer *views
    cdef PyObject **outs
    cdef Py_ssize_t n
    cdef Py_ssize_t nviews

    def __cinit__(self, Py_ssize_t n):
        self.n = n
        self.nviews = 0
        self.pkts = <esp_pkt *>calloc(n if n else 1, sizeof(esp_pkt))
        self.views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
        self.outs = <PyObject **>calloc(n if n else 1, sizeof(PyObject *))
        if self.pkts == NULL or self.views == NULL or self.outs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.views != NULL:
            for i in range(self.nviews):
                PyBuffer_Release(&self.views[i])
        if self.outs != NULL:
            for i in range(self.n):
                if self.outs[i] != NULL:
                    _decref(self.outs[i])
        free(self.pkts)
        free(self.views)
        free(self.outs)

    cdef int take_input(self, Py_ssize_t i, obj) except -1:
        PyObject_GetBuffer(obj, &self.views[i], PyBUF_SIMPLE)
        self.nviews = i + 1
        self.pkts[i].data = <const uint8_t *>self.views[i].buf
        self.pkts[i].len = <size_t>self.views[i].len
        return 0

    cdef int make_output(self, Py_ssize_t i, size_t size) except -1:
        # A new bytes object nobody else sees yet: written in place, then handed out.
        self.outs[i] = _bytes_new(NULL, <Py_ssize_t>size)
        if self.outs[i] == NULL:
            raise MemoryError()
        self.pkts[i].out = <uint8_t *>_bytes_buf(self.outs[i]) if size else NULL
        self.pkts[i].cap = size
        return 0

    cdef object hand_out(self, Py_ssize_t i, size_t size):
        """The i-th output, shrunk to `size` bytes; the burst no longer owns it."""
        cdef PyObject *raw = self.outs[i]
        self.outs[i] = NULL
        if <Py_ssize_t>size != <Py_ssize_t>(self.pkts[i].cap):
            if _PyBytes_Resize(&raw, <Py_ssize_t>size) < 0:
                raise MemoryError()
        out = <object>raw
        _decref(raw)
        return out


cdef SaCore _core_of(sa):
    core = getattr(sa, "_core", sa)
    if not isinstance(core, SaCore):
        raise TypeError("needs a compiled SA (espswitch.datapath.fast) or its SaCore")
    return <SaCore>core


def seal_batch(sa, payloads, int next_header) -> list:
    """Seal every payload with one outbound SA; the GIL is released around the loop.

    Returns one entry per payload: the ESP packet (bytes), or the DropReason when the SA
    refused it (counted, as `encrypt` raising SaRefused). The output bytes objects are
    made before the loop and written in place; nothing Python is touched inside it. A
    packet that crosses a lifetime threshold ends the loop for a moment: the Python
    accounting runs (with the GIL), then the loop goes on.
    """
    cdef SaCore core = _core_of(sa)
    cdef Py_ssize_t n = len(payloads), i, done
    cdef _Burst burst
    cdef list outs, ivs = None
    cdef esp_sa *s = &core.sa
    cdef int account = 0, r
    core._check_ready()
    if not s.outbound:
        raise TypeError("seal_batch needs an outbound SA")
    if not 0 <= next_header <= 255:
        raise ValueError("next header must be 0 to 255")
    burst = _Burst(n)
    if core._iv_source is not None:
        # Only for tests: the IVs of the sequence numbers this batch would use.
        ivs = []
        for i in range(n):
            if s.seq + <uint64_t>i >= s.seq_limit:
                break
            ivb = bytes(core._iv_source(s.seq + 1 + i))
            if len(ivb) != s.iv_len:
                raise ValueError("iv_source returned an IV of the wrong length")
            ivs.append(ivb)
    for i in range(n):
        burst.take_input(i, payloads[i])
        if burst.pkts[i].len > MAX_PACKET:
            raise ValueError("payload too large")
        burst.make_output(i, esp_sealed_len(s, burst.pkts[i].len))
        burst.pkts[i].nh = next_header
        if ivs is not None and i < len(ivs):
            burst.pkts[i].iv = <const uint8_t *><const char *>ivs[i]
    i = 0
    while i < n:
        with nogil:
            done = esp_seal_burst(s, burst.pkts, i, n, &account)
        if account:
            core._account(burst.pkts[done - 1].seq)
        i = done
    outs = [None] * n
    for i in range(n):
        r = burst.pkts[i].result
        if r == 0:
            outs[i] = burst.hand_out(i, burst.pkts[i].out_len)
        elif r <= ERR_CAPACITY:
            raise RuntimeError("OpenSSL failed to seal a packet")
        else:
            outs[i] = _REASONS[-1 - r]
    return outs


def open_batch(sa, packets) -> list:
    """Open every ESP packet with one inbound SA; the GIL is released around the loop.

    Returns one entry per packet, as `open`: `(next_header, payload)` or the DropReason.
    """
    cdef SaCore core = _core_of(sa)
    cdef Py_ssize_t n = len(packets), i, done
    cdef _Burst burst
    cdef list outs
    cdef esp_sa *s = &core.sa
    cdef int account = 0, r
    core._check_ready()
    if s.outbound:
        raise TypeError("open_batch needs an inbound SA")
    burst = _Burst(n)
    for i in range(n):
        burst.take_input(i, packets[i])
        burst.make_output(i, open_capacity(s, burst.pkts[i].len))
    i = 0
    while i < n:
        with nogil:
            done = esp_open_burst(s, burst.pkts, i, n, &account)
        if account:
            core._account(burst.pkts[done - 1].seq)
        i = done
    outs = [None] * n
    for i in range(n):
        r = burst.pkts[i].result
        if r >= 0:
            outs[i] = (r, burst.hand_out(i, burst.pkts[i].out_len))
        elif r <= ERR_CAPACITY:
            raise RuntimeError("OpenSSL failed to open a packet")
        else:
            outs[i] = _REASONS[-1 - r]
    return outs


# -- the honest floor, for the benchmark -------------------------------------------------------

def bare_evp_round_trip(bytes key, bytes salt, Py_ssize_t size, Py_ssize_t n,
                        str cipher="aes-gcm") -> None:
    """Run `n` AEAD encrypt+decrypt round trips of a `size`-byte plaintext with OpenSSL EVP
    in C, one context per direction made once, no ESP framing: what compiled code costs
    before ESP does anything. For `espswitch bench esp`; raises on a failure."""
    cdef EVP_CIPHER_CTX *enc = EVP_CIPHER_CTX_new()
    cdef EVP_CIPHER_CTX *dec = EVP_CIPHER_CTX_new()
    cdef const EVP_CIPHER *evp
    cdef uint8_t *pt
    cdef uint8_t *ct
    cdef uint8_t nonce[12]
    cdef uint8_t aad[8]
    cdef uint8_t tag[16]
    cdef int l = 0, ok = 1
    cdef Py_ssize_t i
    evp = _evp_cipher(CIPHER_CHACHA if cipher == "chacha20-poly1305" else CIPHER_GCM,
                      <int>len(key))
    pt = <uint8_t *>calloc(size + 1, 1)
    ct = <uint8_t *>calloc(size + 1, 1)
    try:
        if enc == NULL or dec == NULL or pt == NULL or ct == NULL or len(salt) != 4:
            raise MemoryError()
        memcpy(nonce, <const char *>salt, 4)
        memset(nonce + 4, 1, 8)
        memset(aad, 2, 8)
        if (EVP_CipherInit_ex(enc, evp, NULL, key, NULL, 1) != 1
                or EVP_CipherInit_ex(dec, evp, NULL, key, NULL, 0) != 1):
            raise ValueError("bad key")
        with nogil:
            for i in range(n):
                nonce[11] = <uint8_t>i
                ok &= EVP_CipherInit_ex(enc, NULL, NULL, NULL, nonce, 1)
                ok &= EVP_CipherUpdate(enc, NULL, &l, aad, 8)
                ok &= EVP_CipherUpdate(enc, ct, &l, pt, <int>size)
                ok &= EVP_CipherFinal_ex(enc, ct + size, &l)
                ok &= EVP_CIPHER_CTX_ctrl(enc, EVP_CTRL_AEAD_GET_TAG, 16, tag)
                ok &= EVP_CipherInit_ex(dec, NULL, NULL, NULL, nonce, 0)
                ok &= EVP_CipherUpdate(dec, NULL, &l, aad, 8)
                ok &= EVP_CipherUpdate(dec, pt, &l, ct, <int>size)
                ok &= EVP_CIPHER_CTX_ctrl(dec, EVP_CTRL_AEAD_SET_TAG, 16, tag)
                ok &= EVP_CipherFinal_ex(dec, pt + size, &l)
        if ok != 1:
            raise RuntimeError("OpenSSL failed in the bare loop")
    finally:
        EVP_CIPHER_CTX_free(enc)
        EVP_CIPHER_CTX_free(dec)
        free(pt)
        free(ct)


# -- the receive pipeline: NIC -> VM (issue 10, first slice) -----------------------------------
#
# `RxTable` holds what the Python slow path installed (`espswitch.datapath.fast.tables`):
# inbound SPIs with their tunnel descriptors (IPv4 or IPv6 endpoints, VXLAN, Geneve or GRE),
# clear tunnels, and the bridges' learned MAC entries. `rx_burst`
# runs a batch of frames received on one NIC port through it without the GIL and sorts each
# frame into one of four outcomes (the Python side turns them into exactly the side effects
# the Python path would have had):
#
#   MISS   nothing was touched: the frame goes to the Python path unchanged;
#   DROP   the ESP core dropped it (counted in the SA, shared state); the port counts it;
#   UPCALL opened, but something after ESP is not for the fast path: the payload goes to
#          the tunnel's Python code right after its `open`;
#   HIT    the inner frame, for one output port.
#
# A frame is a MISS unless everything the C code checks before the ESP open holds, so that
# nothing is counted twice: after the open, the packet never goes back to the start.

cdef enum:
    RX_MISS = 0
    RX_DROP = 1
    RX_UPCALL = 2
    RX_HIT = 3
    RX_CANDIDATE = 4
    RX_CLEAR = 5         # a clear tunnel's packet, its inner frame to a known port

# Encapsulations (encap.py): what a row pushes and pops between the L4 header and the inner
# frame. VXLAN and Geneve ride on UDP to the row's port; GRE is IP protocol 47.
cdef enum:
    ENC_VXLAN = 1
    ENC_GENEVE = 2
    ENC_GRE = 3

cdef enum:
    OUT_PYTHON = 0   # handed back to Python, for the port's own `send`
    OUT_TAP = 1      # written as TapDevice.send does: GRO runs, writev to the TAP
    OUT_PACKET = 2   # sent as PacketSocketDevice.send does: sendmmsg on the socket


cdef extern from *:
    """
    /* The pipelines keep a batch's packets in one buffer: under AddressSanitizer a poisoned
       red zone follows each packet's slot, so an overrun of one packet is caught as it
       would be between separate allocations. */
    #if defined(__SANITIZE_ADDRESS__)
    #include <sanitizer/asan_interface.h>
    #define ESP_REDZONE 32
    #define ESP_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
    #else
    #define ESP_REDZONE 0
    #define ESP_POISON(p, n) ((void)(p), (void)(n))
    #endif
    #define ESP_SLOT(n) ((((n) + 15) & ~(size_t)15) + ESP_REDZONE)
    """
    # Bytes a packet of n bytes takes in a batch buffer (aligned, with the red zone).
    size_t SLOT "ESP_SLOT"(size_t n) nogil
    # Mark [p, p + n) unaddressable (a no-op without AddressSanitizer).
    void POISON "ESP_POISON"(void *p, size_t n) nogil


OUTPUT_TAP = OUT_TAP
"""RxTable.set_outputs: a TAP device's fd, written as TapDevice.send writes."""
OUTPUT_PACKET = OUT_PACKET
"""RxTable.set_outputs: an AF_PACKET socket's fd, sent as PacketSocketDevice.send sends."""


cdef struct rx_spi:
    uint32_t spi
    esp_sa *sa
    uint8_t remote[16]   # the selector's source (the peer): 4 bytes (IPv4) or 16 (IPv6)
    uint8_t local[16]    # the selector's destination (our endpoint)
    int v6               # the underlay's family: IPv6 addresses, else IPv4
    int enc              # ENC_*: what the opened payload must carry
    int proto            # the selector's protocol (ESP's next header): 17 UDP, 47 GRE
    uint32_t dport       # the encapsulation's UDP port (0: GRE)
    uint32_t vni         # the tunnel's key (VNI, GRE key)
    int target           # port index of the tunnel
    int target_bridge
    int phy_bridge       # the bridge the ESP must arrive on (the tunnel's egress bridge)

cdef struct rx_clear:
    uint8_t remote[16]   # the tunnel's remote_ip (4 or 16 bytes, by `v6`)
    uint8_t local[16]    # its local address (packets to other local addresses: misses)
    int v6
    int enc              # ENC_*
    int proto            # the IP protocol it arrives as: 17 UDP, 47 GRE
    uint32_t dport       # the encapsulation's UDP port (0: GRE)
    uint32_t vni
    int target           # port index of the tunnel
    int target_bridge
    int phy_bridge       # the bridge the tunnel's packets arrive on

cdef struct rx_mac:
    uint64_t key         # 0: empty; else (bridge + 1) << 48 | MAC
    int port
    int entry            # index of the entry, for refreshing its age in Python

cdef struct tx_tun:
    esp_sa *sa           # the tunnel's outbound SA (transport mode, no UDP encapsulation),
                         # or NULL: a clear tunnel
    uint16_t *ident      # a clear tunnel's IPv4 ID counter (shared with its underlay)
    uint8_t head[54]     # Ethernet (next hop, internal port, ethertype) + the outer IP header
                         # template: IPv4 (total length, ID and checksum zero) or IPv6
                         # (payload length zero)
    size_t hlen          # 34 (IPv4) or 54 (IPv6): where the IP payload starts
    int v6
    uint32_t csum_base   # IPv4: the sum of the template's header words; IPv6: the sum of
                         # the UDP pseudo header's addresses and next header
    int proto            # the encapsulation's IP protocol (ESP's next header): 17 or 47
    uint32_t dport       # UDP encapsulations: the destination port
    uint8_t enc_head[8]  # after the UDP header, VXLAN's or Geneve's 8 bytes (with the VNI);
                         # GRE: its whole header (4 bytes, 8 with a key)
    size_t enc_len       # bytes pushed in front of the inner frame: 16 (UDP + 8), GRE 4 or 8
    size_t max_frame     # the largest inner frame the tunnel carries whole
    int port             # the tunnel's port index
    int out_port         # the NIC port index the outer frame leaves by
    int phy_entry        # the internal port's own MAC entry on the egress bridge

cdef struct rx_pkt:
    const uint8_t *data
    size_t len
    uint8_t *out
    size_t cap
    size_t out_len
    int kind
    int spi_idx
    int result           # esp_open's result
    int out_port
    int src_entry        # the outer source MAC's entry, or -1
    int inner_entry      # the inner source MAC's entry, or -1
    int cuts             # a miss the Python path may open with an SA (see rx_run)
    int tunnel           # the tunnel port index it came through
    size_t start
    size_t stop
    const uint8_t *frame # a hit's inner frame: frame[0:stop - start], where it lies
    uint64_t seq


ENCAPSULATIONS = {"vxlan": ENC_VXLAN, "geneve": ENC_GENEVE, "gre": ENC_GRE}
"""The encapsulations the pipelines push and pop, by their encap.py names: the values the
table rows take."""


cdef int _enc_kind(enc) except -1:
    if enc not in (ENC_VXLAN, ENC_GENEVE, ENC_GRE):
        raise ValueError(f"unknown encapsulation {enc!r}")
    return enc


cdef int _endpoints(uint8_t *remote, uint8_t *local, a, b) except -1:
    """Copy a row's two addresses (both IPv4 or both IPv6); 1 for IPv6, 0 for IPv4."""
    cdef Py_ssize_t n = len(a)
    if n not in (4, 16) or len(b) != n:
        raise ValueError("two IPv4 (4-byte) or two IPv6 (16-byte) addresses are needed")
    memset(remote, 0, 16)
    memset(local, 0, 16)
    memcpy(remote, <const char *>a, n)
    memcpy(local, <const char *>b, n)
    return n == 16


cdef inline uint64_t mac_key(int bridge, const uint8_t *m) noexcept nogil:
    return ((<uint64_t>(bridge + 1)) << 48) | (<uint64_t>m[0] << 40) | (<uint64_t>m[1] << 32) \
        | (<uint64_t>m[2] << 24) | (<uint64_t>m[3] << 16) | (<uint64_t>m[4] << 8) | m[5]


cdef class RxTable:
    """The fast path's receive tables, filled by the slow path (never by a packet).

    `set(spis, macs, out_ok)`: `spis` is a list of (spi, compiled inbound SA or SaCore,
    remote, local, encapsulation, dst_port, key, target port index, target bridge index,
    egress bridge index); `macs` a list of (bridge index, MAC, port index), position = entry index;
    `out_ok[i]` whether port index i may be a fast output. The table keeps the SAs' cores
    alive while installed.
    """
    cdef rx_spi *spis
    cdef int nspis
    cdef rx_mac *macs
    cdef uint64_t mask
    cdef uint8_t *out_ok
    cdef int nports
    cdef list _cores
    # Clear tunnels on the receive side (set_clear).
    cdef rx_clear *clears
    cdef int nclears
    # The transmit side (set_tx): tunnels by port index, and which ports are fast inputs.
    cdef tx_tun *tuns
    cdef int ntuns
    cdef int *tun_of_port
    cdef int ntx_ports
    cdef list _tx_cores
    # Clear tunnels' IPv4 ID counters: buffers exported by the underlays' arrays.
    cdef Py_buffer *ident_views
    cdef Py_ssize_t nviews
    # Per port index: how the pipelines write its output themselves (OUT_*), and the fd.
    cdef uint8_t *out_kind
    cdef int *out_fd
    cdef int nouts

    def __cinit__(self):
        self.spis = NULL
        self.macs = NULL
        self.out_ok = NULL
        self.nspis = 0
        self.nports = 0
        self.mask = 0
        self._cores = []
        self.clears = NULL
        self.nclears = 0
        self.tuns = NULL
        self.ntuns = 0
        self.tun_of_port = NULL
        self.ntx_ports = 0
        self._tx_cores = []
        self.ident_views = NULL
        self.nviews = 0
        self.out_kind = NULL
        self.out_fd = NULL
        self.nouts = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        free(self.spis)
        free(self.macs)
        free(self.out_ok)
        free(self.tuns)
        free(self.tun_of_port)
        free(self.clears)
        for i in range(self.nviews):
            PyBuffer_Release(&self.ident_views[i])
        free(self.ident_views)
        free(self.out_kind)
        free(self.out_fd)

    def set_outputs(self, outputs) -> None:
        """How each port index's output is written: `outputs[i]` is None (handed back to
        Python, for the port's own `send`) or (OUT_TAP or OUT_PACKET, file descriptor), for
        a port whose `send` is exactly TapDevice.send / PacketSocketDevice.send with the
        port's counters (see `write_frames`). The slow path reinstalls this whenever a
        port's device may have changed, so a descriptor here is never a closed one."""
        cdef Py_ssize_t i, n = len(outputs)
        cdef uint8_t *kind = <uint8_t *>calloc(n if n else 1, 1)
        cdef int *fd = <int *>calloc(n if n else 1, sizeof(int))
        if kind == NULL or fd == NULL:
            free(kind)
            free(fd)
            raise MemoryError()
        try:
            for i in range(n):
                fd[i] = -1
                if outputs[i] is None:
                    continue
                k, f = outputs[i]
                if k not in (OUT_TAP, OUT_PACKET) or f < 0:
                    raise ValueError("an output is (OUT_TAP or OUT_PACKET, fd >= 0)")
                kind[i] = k
                fd[i] = f
        except BaseException:
            free(kind)
            free(fd)
            raise
        free(self.out_kind)
        free(self.out_fd)
        self.out_kind, self.out_fd, self.nouts = kind, fd, <int>n

    def set(self, spis, macs, out_ok) -> None:
        """Install the receive side: `spis` (spi, compiled inbound SA or SaCore, remote,
        local (both 4 or both 16 bytes), encapsulation (ENCAPSULATIONS), dst_port, key,
        target port index, target bridge index, egress bridge index); `macs`, `out_ok`
        as the class says."""
        cdef Py_ssize_t i, n = len(spis), m = len(macs), cap = 4
        cdef rx_spi *s
        cdef rx_mac *t
        cdef uint8_t *ok
        cdef uint64_t k, h, mask
        cdef SaCore core
        cdef bytes mac
        cores = []
        s = <rx_spi *>calloc(n if n else 1, sizeof(rx_spi))
        while cap < 2 * m + 2:
            cap *= 2
        t = <rx_mac *>calloc(cap, sizeof(rx_mac))
        ok = <uint8_t *>calloc(len(out_ok) if len(out_ok) else 1, 1)
        if s == NULL or t == NULL or ok == NULL:
            free(s)
            free(t)
            free(ok)
            raise MemoryError()
        try:
            for i in range(n):
                spi, sa, remote, local, enc, dport, vni, target, tbridge, pbridge = spis[i]
                core = _core_of(sa)
                if core.sa.outbound:
                    raise ValueError("an inbound compiled SA is needed")
                core._check_ready()
                cores.append(core)
                s[i].spi = spi
                s[i].sa = &core.sa
                s[i].v6 = _endpoints(s[i].remote, s[i].local, remote, local)
                s[i].enc = _enc_kind(enc)
                s[i].proto = 47 if enc == ENC_GRE else 17
                s[i].dport = dport
                s[i].vni = vni
                s[i].target = target
                s[i].target_bridge = tbridge
                s[i].phy_bridge = pbridge
            mask = <uint64_t>(cap - 1)
            for i in range(m):
                bridge, mac, port = macs[i]
                if len(mac) != 6:
                    raise ValueError("a MAC is 6 bytes")
                k = mac_key(bridge, <const uint8_t *><const char *>mac)
                h = (k * <uint64_t>0x9E3779B97F4A7C15) >> 40
                while t[h & mask].key != 0 and t[h & mask].key != k:
                    h += 1
                t[h & mask].key = k
                t[h & mask].port = port
                t[h & mask].entry = <int>i
            for i in range(len(out_ok)):
                ok[i] = 1 if out_ok[i] else 0
        except BaseException:
            free(s)
            free(t)
            free(ok)
            raise
        free(self.spis)
        free(self.macs)
        free(self.out_ok)
        self.spis, self.nspis = s, <int>n
        self.macs, self.mask = t, mask
        self.out_ok, self.nports = ok, <int>len(out_ok)
        self._cores = cores

    def set_tx(self, tuns, tx_in) -> None:
        """Install the transmit side: `tuns` a list of (tunnel port index, compiled
        outbound SA or SaCore, or for a clear tunnel its IPv4 ID counter (an array of one
        unsigned short, shared with its underlay), Ethernet + outer IP header template (34
        bytes: IPv4; 54: IPv6), encapsulation (ENCAPSULATIONS), UDP destination port (0 for
        GRE), the encapsulation's header (VXLAN, Geneve: the 8 bytes after UDP; GRE: the
        whole header, 4 or 8 bytes), largest inner frame, NIC port index, MAC entry of the
        internal port's MAC); `tx_in[i]` whether port index i may be a fast input. Ports
        are those of `set`."""
        cdef Py_ssize_t i, n = len(tuns), m = len(tx_in), nv = 0
        cdef tx_tun *t
        cdef int *of
        cdef Py_buffer *views
        cdef SaCore core
        cdef bytes head
        cdef uint32_t s
        cdef int k
        cores = []
        t = <tx_tun *>calloc(n if n else 1, sizeof(tx_tun))
        of = <int *>calloc(m if m else 1, sizeof(int))
        views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
        if t == NULL or of == NULL or views == NULL:
            free(t)
            free(of)
            free(views)
            raise MemoryError()
        try:
            for i in range(m):
                of[i] = -2 if tx_in[i] else -1   # -2: an input, not a tunnel
            for i in range(n):
                port, sa, head, enc, dport, enc_head, max_frame, out_port, phy_entry = tuns[i]
                if len(head) not in (34, 54) or not 0 <= port < m:
                    raise ValueError("a 34 or 54-byte header and a port index are needed")
                t[i].enc_len = len(enc_head) + (8 if _enc_kind(enc) != ENC_GRE else 0)
                if len(enc_head) > 8 or t[i].enc_len not in (4, 8, 16):
                    raise ValueError("an encapsulation header of 4 or 8 bytes is needed")
                if isinstance(sa, (SaCore,)) or hasattr(sa, "_core"):
                    core = _core_of(sa)
                    if not core.sa.outbound:
                        raise ValueError("an outbound compiled SA is needed")
                    core._check_ready()
                    cores.append(core)
                    t[i].sa = &core.sa
                else:
                    PyObject_GetBuffer(sa, &views[nv], PyBUF_WRITABLE)
                    nv += 1
                    if views[nv - 1].len != 2:
                        raise ValueError("an IPv4 ID counter is one unsigned short")
                    t[i].ident = <uint16_t *>views[nv - 1].buf
                    cores.append(None)
                t[i].hlen = len(head)
                t[i].v6 = t[i].hlen == 54
                memcpy(t[i].head, <const char *>head, t[i].hlen)
                s = 0
                if t[i].v6:
                    # The UDP pseudo header's constant part (RFC 8200 §8.1): addresses and
                    # next header; the length is added per packet.
                    for k in range(16):
                        s += (<uint32_t>t[i].head[22 + 2 * k] << 8) | t[i].head[23 + 2 * k]
                    s += 17
                else:
                    for k in range(10):
                        s += (<uint32_t>t[i].head[14 + 2 * k] << 8) | t[i].head[15 + 2 * k]
                t[i].csum_base = s
                t[i].proto = 47 if enc == ENC_GRE else 17
                t[i].dport = dport
                memcpy(t[i].enc_head, <const char *>enc_head, len(enc_head))
                t[i].max_frame = max_frame
                t[i].port = port
                t[i].out_port = out_port
                t[i].phy_entry = phy_entry
                of[port] = <int>i
        except BaseException:
            for i in range(nv):
                PyBuffer_Release(&views[i])
            free(t)
            free(of)
            free(views)
            raise
        for i in range(self.nviews):
            PyBuffer_Release(&self.ident_views[i])
        free(self.ident_views)
        free(self.tuns)
        free(self.tun_of_port)
        self.ident_views, self.nviews = views, nv
        self.tuns, self.ntuns = t, <int>n
        self.tun_of_port, self.ntx_ports = of, <int>m
        self._tx_cores = cores

    def set_clear(self, rows) -> None:
        """Install the clear tunnels of the receive side: `rows` a list of (remote, local
        (both 4 or both 16 bytes), encapsulation (ENCAPSULATIONS), dst_port, key, target
        port index, target bridge index, egress bridge index)."""
        cdef Py_ssize_t i, n = len(rows)
        cdef rx_clear *c = <rx_clear *>calloc(n if n else 1, sizeof(rx_clear))
        if c == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                remote, local, enc, dport, vni, target, tbridge, pbridge = rows[i]
                c[i].v6 = _endpoints(c[i].remote, c[i].local, remote, local)
                c[i].enc = _enc_kind(enc)
                c[i].proto = 47 if enc == ENC_GRE else 17
                c[i].dport = dport
                c[i].vni = vni
                c[i].target = target
                c[i].target_bridge = tbridge
                c[i].phy_bridge = pbridge
        except BaseException:
            free(c)
            raise
        free(self.clears)
        self.clears, self.nclears = c, <int>n

    @property
    def nclear(self) -> int:
        return self.nclears

    @property
    def ntun(self) -> int:
        return self.ntuns

    @property
    def nspi(self) -> int:
        return self.nspis

    cdef inline int lookup(self, int bridge, const uint8_t *m, int *entry) noexcept nogil:
        """The port index of `m` learned on `bridge` (entry index in `*entry`), or -1."""
        cdef uint64_t k = mac_key(bridge, m)
        cdef uint64_t h = (k * <uint64_t>0x9E3779B97F4A7C15) >> 40
        # The table is at most half full: a probe always meets an empty slot.
        while self.macs[h & self.mask].key != 0:
            if self.macs[h & self.mask].key == k:
                entry[0] = self.macs[h & self.mask].entry
                return self.macs[h & self.mask].port
            h += 1
        return -1

    cdef inline int find_spi(self, uint32_t spi) noexcept nogil:
        cdef int i
        # A handful of SAs per host: a scan beats a hash at this size.
        for i in range(self.nspis):
            if self.spis[i].spi == spi:
                return i
        return -1


cdef struct rx_l3:
    int v6
    int proto            # IPv4 protocol, IPv6 next header
    size_t l4            # where the L4 header starts
    size_t end           # where the datagram ends by its header (within the frame)
    const uint8_t *src
    const uint8_t *dst
    size_t alen          # 4 or 16


cdef inline int rx_outer(const uint8_t *f, size_t n, rx_l3 *o) noexcept nogil:
    """The outer IP header of an untagged frame, as the tunnel layer reads it (receive,
    receive6): 1 with `o` filled for IPv4 without options and IPv6 without extension
    headers, not a fragment, the datagram within the frame; 0 (a miss: the Python path
    reassembles, walks or counts it) for anything else."""
    cdef size_t total
    if n >= 14 + 20 and f[12] == 0x08 and f[13] == 0x00:
        if f[14] != 0x45 or (f[20] & 0x3F) or f[21]:
            return 0                  # IP options, a fragment
        total = (<size_t>f[16] << 8) | f[17]
        if total < 20 or 14 + total > n:
            return 0                  # malformed: counted by the Python path
        o.v6 = 0
        o.proto = f[23]
        o.l4 = 34
        o.end = 14 + total
        o.src = f + 26
        o.dst = f + 30
        o.alen = 4
        return 1
    if n >= 14 + 40 and f[12] == 0x86 and f[13] == 0xDD:
        if f[14] >> 4 != 6:
            return 0
        # The next header is the protocol itself: an extension header or a fragment (44)
        # matches no row and stays a miss.
        total = (<size_t>f[18] << 8) | f[19]
        if 54 + total > n:
            return 0                  # a payload length past the frame: counted by Python
        o.v6 = 1
        o.proto = f[20]
        o.l4 = 54
        o.end = 54 + total
        o.src = f + 22
        o.dst = f + 38
        o.alen = 16
        return 1
    return 0


cdef inline int same_addr(const uint8_t *a, const uint8_t *b, size_t n) noexcept nogil:
    return memcmp(a, b, n) == 0


cdef int encap_pop(int enc, const uint8_t *b, size_t l4, size_t end, size_t *start,
                   size_t *stop, uint32_t *key) noexcept nogil:
    """encap.<Vxlan|Geneve|Gre>.pop on b[l4:end] (l4 <= end): 1 with the key and the inner
    frame b[start:stop] (at least 14 bytes) where the Python pop finds the same; 0 where it
    refuses the packet and where the fast path leaves it to the Python path (Geneve
    options, GRE checksums: the Python path skips, verifies and counts them)."""
    cdef size_t udp_end, off
    cdef uint32_t flags
    if enc == ENC_GRE:
        if end - l4 < 4 + 14:
            return 0
        flags = (<uint32_t>b[l4] << 8) | b[l4 + 1]
        # Only the key bit may be set: routing, a version, sequence numbers, a checksum
        # are the Python path's; the payload must be Ethernet.
        if (flags & ~(<uint32_t>0x2000)) or b[l4 + 2] != 0x65 or b[l4 + 3] != 0x58:
            return 0
        off = l4 + 4
        key[0] = 0
        if flags:
            if end - off < 4:
                return 0
            key[0] = get32(b + off)
            off += 4
        if end - off < 14:
            return 0
        start[0] = off
        stop[0] = end
        return 1
    # VXLAN and Geneve: the UDP length holds their 8 bytes and an Ethernet header and ends
    # within `end`; what follows it (Ethernet padding, TFC padding) is not the frame's.
    if end - l4 < 8 + 8 + 14:
        return 0
    udp_end = l4 + ((<size_t>b[l4 + 4] << 8) | b[l4 + 5])
    if udp_end < l4 + 8 + 8 + 14 or udp_end > end:
        return 0
    if enc == ENC_VXLAN:
        if not (b[l4 + 8] & 0x08):
            return 0                  # the I flag
    elif (b[l4 + 8] != 0 or (b[l4 + 9] & 0xC0) or b[l4 + 10] != 0x65
            or b[l4 + 11] != 0x58):
        # Geneve: version 0 without options, neither the critical nor the control (OAM)
        # bit, Ethernet inside (anything else the Python path skips or drops and counts).
        return 0
    key[0] = (<uint32_t>b[l4 + 12] << 16) | (<uint32_t>b[l4 + 13] << 8) | b[l4 + 14]
    start[0] = l4 + 16
    stop[0] = udp_end
    return 1


cdef void rx_classify(RxTable t, rx_pkt *p, int in_port, int in_bridge) noexcept nogil:
    """What can be decided before the ESP open, without touching any state: sets
    p.kind to RX_CANDIDATE (with spi_idx), RX_CLEAR or RX_MISS."""
    cdef const uint8_t *f = p.data
    cdef size_t n = p.len
    cdef int e = -1, i
    cdef rx_spi *s
    cdef rx_l3 o
    p.kind = RX_MISS
    p.src_entry = -1
    p.inner_entry = -1
    # IPv4 or IPv6 (tagged or not) carrying ESP, UDP (ESP in UDP, VXLAN, Geneve), GRE or
    # an IPv6 fragment: if it stays a miss, the Python path may open it with an installed
    # SA or deliver it through a tunnel.
    p.cuts = 0
    if n >= 14 + 20 and f[12] == 0x08 and f[13] == 0x00:
        p.cuts = f[23] == 50 or f[23] == 17 or f[23] == 47
    elif n >= 18 + 20 and f[12] == 0x81 and f[13] == 0x00 and f[16] == 0x08 and f[17] == 0:
        p.cuts = f[27] == 50 or f[27] == 17 or f[27] == 47
    elif n >= 14 + 40 and f[12] == 0x86 and f[13] == 0xDD:
        p.cuts = f[20] == 50 or f[20] == 17 or f[20] == 47 or f[20] == 44
    elif n >= 18 + 40 and f[12] == 0x81 and f[13] == 0x00 and f[16] == 0x86 and f[17] == 0xDD:
        p.cuts = f[24] == 50 or f[24] == 17 or f[24] == 47 or f[24] == 44
    if not rx_outer(f, n, &o):
        return
    if o.proto == 17 or o.proto == 47:
        rx_classify_clear(t, p, in_port, in_bridge, &o)
        return
    # ESP: the SPI and sequence number at least.
    if o.proto != 50 or o.end - o.l4 < 8:
        return                        # not ESP; or malformed: counted by the Python path
    i = t.find_spi(get32(f + o.l4))
    if i < 0:
        return
    s = &t.spis[i]
    if (s.phy_bridge != in_bridge or s.v6 != o.v6 or not same_addr(o.dst, s.local, o.alen)
            or not same_addr(o.src, s.remote, o.alen)):
        return
    if not (f[6] & 1):
        # The bridge learns the sender: only an entry already on this port is a no-op.
        if t.lookup(in_bridge, f + 6, &e) != in_port:
            return
        p.src_entry = e
    p.spi_idx = i
    p.start = o.l4                    # the ESP packet is f[l4:end]
    p.stop = o.end
    p.kind = RX_CANDIDATE


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* RFC 1071 section 2: the one's complement sum does not depend on byte order, so the
       bulk is summed as native 32-bit words into 64 bits (the compiler vectorises it),
       folded to 16 bits and, on a little-endian host, byte-swapped; what is left over
       (at most 3 bytes) is added as big-endian words. Same folded value as the byte-pair
       loop, including a nonzero sum that folds to 0xFFFF. */
    static inline uint64_t esp_ones_sum(const uint8_t *p, size_t n, uint64_t s)
    {
        uint64_t a = 0, b = 0, c = 0, d = 0;
        uint32_t w0, w1, w2, w3;
        while (n >= 16) {
            memcpy(&w0, p, 4); memcpy(&w1, p + 4, 4);
            memcpy(&w2, p + 8, 4); memcpy(&w3, p + 12, 4);
            a += w0; b += w1; c += w2; d += w3;
            p += 16; n -= 16;
        }
        while (n >= 4) {
            memcpy(&w0, p, 4);
            a += w0;
            p += 4; n -= 4;
        }
        a = (a & 0xFFFFFFFFu) + (a >> 32) + (b & 0xFFFFFFFFu) + (b >> 32)
            + (c & 0xFFFFFFFFu) + (c >> 32) + (d & 0xFFFFFFFFu) + (d >> 32);
        while (a >> 16)
            a = (a & 0xFFFF) + (a >> 16);
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        a = ((a & 0xFF) << 8) | (a >> 8);
    #endif
        s += a;
        if (n >= 2) {
            s += ((uint64_t)p[0] << 8) | p[1];
            p += 2; n -= 2;
        }
        if (n)
            s += (uint64_t)p[0] << 8;
        return s;
    }
    """
    # `s` plus the 16-bit big-endian words of p[0:n] (an odd last byte padded with 0), as
    # a sum for csum_fold.
    uint64_t ones_sum "esp_ones_sum"(const uint8_t *p, size_t n, uint64_t s) nogil


cdef inline uint32_t csum_fold(uint64_t s) noexcept nogil:
    """The checksum (complemented, 16 bits) of a word sum."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint32_t>(~s & 0xFFFF)


cdef inline uint64_t pseudo6_sum(const uint8_t *src, const uint8_t *dst, uint32_t proto,
                                 size_t length) noexcept nogil:
    """The IPv6 pseudo header's word sum (checksum.ipv6_pseudo_header_sum)."""
    return ones_sum(src, 16, ones_sum(dst, 16, <uint64_t>proto + length))


cdef void rx_classify_clear(RxTable t, rx_pkt *p, int in_port, int in_bridge,
                            const rx_l3 *o) noexcept nogil:
    """A UDP or GRE datagram (IPv4 or IPv6, see rx_outer): RX_CLEAR when it is a clear
    tunnel's packet whose inner frame goes to a known port, exactly as the Python path
    would take it (tunnel_layer._udp_encap_input / _ip_encap_input, the encapsulation's
    pop, the endpoint by remote address and key); else it stays a miss."""
    cdef const uint8_t *f = p.data
    cdef size_t start = 0, stop = 0, ulen
    cdef uint32_t dport = 0, key = 0
    cdef int i, e = -1
    cdef rx_clear *c = NULL
    if t.nclears == 0:
        return
    if o.proto == 17:
        if o.end - o.l4 < 8:
            return
        dport = (<uint32_t>f[o.l4 + 2] << 8) | f[o.l4 + 3]
    for i in range(t.nclears):
        c = &t.clears[i]
        if (c.proto == o.proto and c.dport == dport and c.phy_bridge == in_bridge
                and c.v6 == o.v6 and same_addr(o.src, c.remote, o.alen)
                and same_addr(o.dst, c.local, o.alen)
                and encap_pop(c.enc, f, o.l4, o.end, &start, &stop, &key) and key == c.vni):
            break
        c = NULL
    if c == NULL:
        return
    if o.v6 and o.proto == 17 and (f[o.l4 + 6] or f[o.l4 + 7]):
        # Over IPv6 a UDP checksum that is not zero must be right (the Python path
        # counts a wrong one); zero is accepted for tunnels (RFC 6935).
        ulen = (<size_t>f[o.l4 + 4] << 8) | f[o.l4 + 5]
        if csum_fold(ones_sum(f + o.l4, ulen, pseudo6_sum(o.src, o.dst, 17, ulen))) != 0:
            return
    if not (f[6] & 1):
        # The bridge learns the sender: only an entry already on this port is a no-op.
        if t.lookup(in_bridge, f + 6, &e) != in_port:
            return
        p.src_entry = e
    if not rx_inner(t, p, f + start, c.target, c.target_bridge):
        return
    p.tunnel = c.target
    p.start = start
    p.stop = stop
    p.kind = RX_CLEAR


cdef int rx_inner(RxTable t, rx_pkt *p, const uint8_t *inner, int target,
                  int tbridge) noexcept nogil:
    """What the bridge of tunnel `target` does with `inner` (at least 14 bytes): 1 when it
    goes to one known fast output port (p.out_port; p.inner_entry, the inner source's
    entry), 0 when the Python path must decide."""
    cdef int e = -1, out
    if inner[12] == 0x81 and inner[13] == 0x00:
        return 0
    if not (inner[6] & 1):
        if t.lookup(tbridge, inner + 6, &e) != target:
            return 0
        p.inner_entry = e
    if inner[0] & 1:
        return 0                      # broadcast, multicast: flooded by the Python path
    out = t.lookup(tbridge, inner, &e)
    if out < 0 or out == target or out >= t.nports or not t.out_ok[out]:
        return 0
    p.out_port = out
    return 1


cdef void rx_after_open(RxTable t, rx_pkt *p) noexcept nogil:
    """The payload p.out[0:p.out_len] of an opened packet: selector, the encapsulation's
    pop, key and MACs; sets HIT (the inner frame at p.out[p.start:p.stop], p.out_port) or
    UPCALL."""
    cdef rx_spi *s = &t.spis[p.spi_idx]
    cdef const uint8_t *pl = p.out
    cdef size_t end = p.out_len, start = 0, stop = 0
    cdef uint32_t key = 0
    p.kind = RX_UPCALL
    # Selector (transport mode, Selector.match_transport): the next header is the
    # encapsulation's protocol, UDP to the tunnel's port; the outer addresses were matched
    # before the open. (No UDP checksum is checked inside ESP: its ICV covers more.)
    if p.result != s.proto:
        return
    if s.proto == 17 and (end < 8 or ((<uint32_t>pl[2] << 8) | pl[3]) != s.dport):
        return
    if not encap_pop(s.enc, pl, 0, end, &start, &stop, &key) or key != s.vni:
        return
    if not rx_inner(t, p, pl + start, s.target, s.target_bridge):
        return
    p.start = start
    p.stop = stop
    p.kind = RX_HIT


cdef Py_ssize_t rx_run(RxTable t, rx_pkt *pkts, Py_ssize_t i, Py_ssize_t n,
                       int *account, int *cut) noexcept nogil:
    """Open and finish the candidates of pkts[i:n] in order; stops after a packet whose SA
    needs the slow path's lifetime accounting (`*account` set), as the bursts do.

    Exactness across a batch: the Python path handles a batch in order, the fast path's
    misses after its hits. So after the first miss that the Python path may open with an
    SA or deliver through a tunnel (`cuts`), and after the first upcall (which may learn a
    MAC, and is delivered later than a hit), every later frame of the batch is a miss
    too (`*cut`): the side effects on SAs, MAC tables and each port's output stay in
    arrival order."""
    cdef rx_pkt *p
    cdef esp_sa *sa
    account[0] = 0
    while i < n:
        p = &pkts[i]
        i += 1
        if cut[0]:
            p.kind = RX_MISS
            continue
        if p.kind == RX_CLEAR:
            # Nothing to open: the inner frame leaves from where it arrived.
            p.frame = p.data + p.start
            p.kind = RX_HIT
            continue
        if p.kind != RX_CANDIDATE:
            if p.cuts:
                cut[0] = 1
            continue
        sa = t.spis[p.spi_idx].sa
        pthread_mutex_lock(&sa.lock)
        p.result = esp_open(sa, p.data + p.start, p.stop - p.start, p.out, p.cap,
                            &p.out_len, &p.seq, account)
        pthread_mutex_unlock(&sa.lock)
        if p.result <= ERR_CAPACITY:
            p.kind = RX_MISS              # nothing moved; the Python path meets it again
            cut[0] = 1
        elif p.result < 0:
            p.kind = RX_DROP
        else:
            rx_after_open(t, p)
            if p.kind == RX_UPCALL:
                cut[0] = 1
            elif p.kind == RX_HIT:
                p.frame = p.out + p.start
        if account[0]:
            break
    return i


cdef int hand_out(RxTable t, dict outputs, dict written, int port, const uint8_t *f,
                  size_t n) except -2:
    """A frame f[0:n] for port index `port`: noted for its installed output (returns
    `port`: `write_written` writes it) or copied into `outputs[port]` (returns -1)."""
    cdef list lst
    if out_direct(t, port):
        written[port] = None
        return port
    frame = PyBytes_FromStringAndSize(<const char *>f, <Py_ssize_t>n)
    lst = outputs.get(port)
    if lst is None:
        outputs[port] = [frame]
    else:
        lst.append(frame)
    return -1


cdef void write_written(RxTable t, dict written, const uint8_t **fs, const size_t *ns,
                        const int *ports, Py_ssize_t n) except *:
    """Write each port of `written` its frames fs[i][0:ns[i]] (those with ports[i] ==
    port), in arrival order, in one call; written[port] becomes write_port's result."""
    cdef const uint8_t **gfs
    cdef size_t *gns
    cdef Py_ssize_t i, m
    if not written:
        return
    gfs = <const uint8_t **>calloc(n if n else 1, sizeof(uint8_t *))
    gns = <size_t *>calloc(n if n else 1, sizeof(size_t))
    try:
        if gfs == NULL or gns == NULL:
            raise MemoryError()
        for port in list(written):
            m = 0
            for i in range(n):
                if ports[i] == port:
                    gfs[m] = fs[i]
                    gns[m] = ns[i]
                    m += 1
            written[port] = write_port(t, port, gfs, gns, m)
    finally:
        free(gfs)
        free(gns)


# -- what the FastLoop counts itself --------------------------------------------------------
#
# A batch the pipeline takes whole (every frame a hit, every output an installed one, every
# write clean) has effects the FastLoop keeps in C arrays (`loop_acct`) and folds into the
# ports' statistics and the MAC ages later; such a batch builds no Python result at all.

cdef enum:
    NCTR = 4             # counters per port index:
    C_RX_PACKETS = 0
    C_RX_BYTES = 1
    C_TX_PACKETS = 2
    C_TX_BYTES = 3

cdef struct loop_acct:
    uint64_t *ctr        # NCTR per port index
    uint8_t *touched     # per MAC entry index: its age to refresh
    Py_ssize_t nports
    Py_ssize_t nentries
    uint64_t hits
    uint64_t tx_hits
    uint64_t batches


cdef inline bint acct_port(const loop_acct *a, int port) noexcept nogil:
    return 0 <= port < a.nports


cdef inline bint acct_entry(const loop_acct *a, int e) noexcept nogil:
    return e < a.nentries             # -1: none


cdef inline void acct_add(loop_acct *a, int port, int which, uint64_t packets,
                          uint64_t nbytes) noexcept nogil:
    cdef uint64_t *c = a.ctr + <Py_ssize_t>port * NCTR + which
    c[0] += packets
    c[1] += nbytes


cdef inline void acct_touch(loop_acct *a, int e) noexcept nogil:
    if e >= 0:
        a.touched[e] = 1


cdef dict write_direct(RxTable t, const uint8_t **fs, const size_t *ns, const int *ports,
                       Py_ssize_t n):
    """write_written for frames that all have installed outputs (ports[i])."""
    cdef dict written = {}
    cdef Py_ssize_t i
    cdef int last = -1
    for i in range(n):
        if ports[i] != last:
            last = ports[i]
            written[last] = None
    write_written(t, written, fs, ns, ports, n)
    return written


cdef bint acct_written(loop_acct *a, dict written) except -1:
    """Count `written` (write_written's) into `a` when every write was clean; False (and
    nothing counted) when one dropped a frame or found it too big."""
    for _nbytes, res in written.values():
        if res[1] or res[2]:
            return False
    for port, (nbytes, res) in written.items():
        acct_add(a, <int>port, C_TX_PACKETS, <uint64_t>res[0], <uint64_t>nbytes)
    return True


cdef bint rx_countable(RxTable t, const rx_pkt *pkts, Py_ssize_t n,
                       const loop_acct *a) noexcept nogil:
    """Whether rx_burst's batch is one the FastLoop counts itself: every frame a hit for an
    installed output, every index inside what the loop counts."""
    cdef Py_ssize_t i
    cdef const rx_pkt *p
    if n == 0:
        return 0
    for i in range(n):
        p = &pkts[i]
        if (p.kind != RX_HIT or not out_direct(t, p.out_port)
                or not acct_port(a, p.out_port) or not acct_port(a, p.tunnel)
                or not acct_entry(a, p.src_entry) or not acct_entry(a, p.inner_entry)):
            return 0
    return 1


cdef void rx_count(loop_acct *a, const rx_pkt *pkts, Py_ssize_t n,
                   int in_port) noexcept nogil:
    """FastTables._received's counts for a batch `rx_countable` accepted."""
    cdef Py_ssize_t i
    cdef const rx_pkt *p
    cdef uint64_t nbytes = 0
    for i in range(n):
        p = &pkts[i]
        nbytes += p.len
        acct_add(a, p.tunnel, C_RX_PACKETS, 1, p.stop - p.start)
        acct_touch(a, p.src_entry)
        acct_touch(a, p.inner_entry)
    acct_add(a, in_port, C_RX_PACKETS, <uint64_t>n, nbytes)
    a.hits += <uint64_t>n
    a.batches += 1


def rx_burst(RxTable table, frames, int in_port, int in_bridge):
    """Run frames received on port index `in_port` (of bridge index `in_bridge`) through
    `table`; the GIL is released for the per-packet work. `frames`: a list of frames, or
    a RingBatch (read where the kernel wrote them).

    Returns `(kinds, outputs, written, tunnel_rx, upcalls, drops, entries)`: `kinds` one
    byte per frame (0 miss, 1 drop, 2 upcall, 3 hit); `outputs` {out port index: [inner
    frame, ...]} in arrival order, for ports without an installed output; `written` {out
    port index: (bytes, (sent, dropped, too big))} for ports with one, already
    written (`set_outputs`); `tunnel_rx` {tunnel port index: [packets, bytes]} delivered;
    `upcalls` of (frame index, spi index, next header, payload); `drops` of (frame
    index, spi index, DropReason); `entries` the set of MAC entry indices whose age to
    refresh (outer sources of every frame not missed, inner sources of hits).
    """
    return _rx_burst(table, frames, in_port, in_bridge, NULL)


cdef object _rx_burst(RxTable table, frames, int in_port, int in_bridge, loop_acct *acct):
    """rx_burst; with `acct` (the FastLoop's), a batch `rx_countable` accepts whose writes
    were all clean is counted into *acct and gives None instead of the result."""
    cdef RingBatch rb = frames if isinstance(frames, RingBatch) else None
    cdef Py_ssize_t n = len(frames), i, done
    cdef dict prewritten = None
    cdef rx_pkt *pkts
    cdef Py_buffer *views
    cdef Py_ssize_t nviews = 0
    cdef uint8_t *arena = NULL
    cdef const uint8_t **fs = NULL
    cdef size_t *ns = NULL
    cdef int *ports = NULL
    cdef rx_pkt *p
    cdef int account = 0, cut = 0
    cdef size_t total = 0
    # The result's objects are made only for a batch the loop does not count itself.
    cdef bytearray kinds
    cdef list upcalls, drops
    cdef dict outputs, tunnel_rx, written = None
    cdef set entries
    cdef int tunnel
    pkts = <rx_pkt *>calloc(n if n else 1, sizeof(rx_pkt))
    views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
    try:
        if pkts == NULL or views == NULL:
            raise MemoryError()
        for i in range(n):
            if rb is not None:        # frames still in their ring slots
                pkts[i].data = rb.fs[i]
                pkts[i].len = rb.ns[i]
                continue
            PyObject_GetBuffer(frames[i], &views[i], PyBUF_SIMPLE)
            nviews = i + 1
            pkts[i].data = <const uint8_t *>views[i].buf
            pkts[i].len = <size_t>views[i].len
        with nogil:
            for i in range(n):
                rx_classify(table, &pkts[i], in_port, in_bridge)
        # One buffer for what the batch opens: what leaves through an installed output is
        # written from here (or, from a clear tunnel, from the frame it arrived in),
        # everything else is copied into bytes.
        for i in range(n):
            p = &pkts[i]
            if p.kind == RX_CANDIDATE:
                p.cap = open_capacity(table.spis[p.spi_idx].sa, p.stop - p.start)
                p.tunnel = table.spis[p.spi_idx].target
            else:
                continue
            total += SLOT(p.cap)
        arena = <uint8_t *>malloc(total if total else 1)
        if arena == NULL:
            raise MemoryError()
        total = 0
        for i in range(n):
            p = &pkts[i]
            if p.kind == RX_CANDIDATE:
                p.out = arena + total
                total += SLOT(p.cap)
                POISON(p.out + p.cap, SLOT(p.cap) - p.cap)
        fs = <const uint8_t **>calloc(n if n else 1, sizeof(uint8_t *))
        ns = <size_t *>calloc(n if n else 1, sizeof(size_t))
        ports = <int *>malloc((n if n else 1) * sizeof(int))
        if fs == NULL or ns == NULL or ports == NULL:
            raise MemoryError()
        for i in range(n):
            ports[i] = -1
        i = 0
        while i < n:
            with nogil:
                done = rx_run(table, pkts, i, n, &account, &cut)
            if account:
                (<SaCore>table._cores[pkts[done - 1].spi_idx])._account(pkts[done - 1].seq)
            i = done
        if acct != NULL and rx_countable(table, pkts, n, acct):
            for i in range(n):
                p = &pkts[i]
                fs[i] = p.frame
                ns[i] = p.stop - p.start
                ports[i] = p.out_port
            prewritten = write_direct(table, fs, ns, ports, n)
            if acct_written(acct, prewritten):
                rx_count(acct, pkts, n, in_port)
                return None
            written = prewritten      # a write was not clean: Python counts it all
        kinds = bytearray(n)
        upcalls, drops, outputs, tunnel_rx, entries = [], [], {}, {}, set()
        if written is None:
            written = {}
        for i in range(n):
            p = &pkts[i]
            kinds[i] = p.kind
            if p.kind == RX_MISS:
                continue
            if p.src_entry >= 0:
                entries.add(p.src_entry)
            if p.kind == RX_DROP:
                drops.append((i, p.spi_idx, _REASONS[-1 - p.result]))
            elif p.kind == RX_UPCALL:
                upcalls.append((i, p.spi_idx, p.result,
                                PyBytes_FromStringAndSize(<char *>p.out, p.out_len)))
            else:
                if p.inner_entry >= 0:
                    entries.add(p.inner_entry)
                tunnel = p.tunnel
                rx = tunnel_rx.get(tunnel)
                if rx is None:
                    tunnel_rx[tunnel] = [1, p.stop - p.start]
                else:
                    rx[0] += 1
                    rx[1] += p.stop - p.start
                if prewritten is None:
                    fs[i] = p.frame
                    ns[i] = p.stop - p.start
                    ports[i] = hand_out(table, outputs, written, p.out_port, p.frame, ns[i])
        if prewritten is None:
            write_written(table, written, fs, ns, ports, n)
        return kinds, outputs, written, tunnel_rx, upcalls, drops, entries
    finally:
        for i in range(nviews):
            PyBuffer_Release(&views[i])
        free(pkts)
        free(views)
        free(arena)
        free(fs)
        free(ns)
        free(ports)


cdef object _hand_out(PyObject **outs, Py_ssize_t i, size_t size):
    """outs[i] shrunk to `size` bytes; the caller no longer owns it."""
    cdef PyObject *raw = outs[i]
    outs[i] = NULL
    if _PyBytes_Resize(&raw, <Py_ssize_t>size) < 0:
        raise MemoryError()
    out = <object>raw
    _decref(raw)
    return out


# -- the transmit pipeline: VM -> NIC (issue 10) -----------------------------------------------
#
# `tx_burst` runs a batch of reads from one VM port (a TAP) through the tables the slow path
# installed with `RxTable.set_tx`: the bridge's MAC lookup to a tunnel, then per frame (or
# per TCP segment of a TSO super-frame, see datapath/gso.py) the encapsulation's push (VXLAN,
# Geneve, GRE), ESP seal (transport mode) or none (a clear tunnel), the outer IPv4 or IPv6
# and Ethernet headers, for the NIC port behind the tunnel's egress bridge. Each outer packet
# is built in one buffer: the encapsulation's headers and the inner frame (a segment's
# headers and its slice of the payload, checksums completed) are written where the ESP
# payload goes, and sealed in place.
#
#   MISS  nothing was touched: the Python path takes the read (and, for the batch's order,
#         every read after it);
#   TAKEN its frames were sent, or refused by the SA (hard lifetime, sequence space:
#         counted in the SA and listed in `drops`).

cdef enum:
    TX_MISS = 0
    TX_TAKEN = 3
    TX_CANDIDATE = 4

# virtio_net_hdr (linux/virtio_net.h), what a TAP read with IFF_VNET_HDR starts with.
cdef enum:
    GSO_MAX_SEGMENTS = 256    # datapath/gso.py MAX_SEGMENTS
    VNET_LEN = 10
    VNET_NEEDS_CSUM = 1
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_ECN = 0x80

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)

cdef struct tx_pkt:
    const uint8_t *data  # the frame (after the virtio-net header)
    size_t len
    int kind
    int tun
    int src_entry        # the inner source MAC's entry on the input bridge, or -1
    int csum_start       # no GSO: where the partial checksum starts, or -1: none
    int csum_at          # ... and where it goes
    size_t mss           # TCPv4 GSO: the segment payload size; 0: one frame
    size_t hlen          # GSO: Ethernet + IPv4 + TCP header length
    size_t l4            # GSO: where the TCP header starts
    int nseg             # the frames it stands for
    int done             # how many of them are built
    Py_ssize_t first     # its first output slot


cdef inline uint32_t flow_port(const uint8_t *f, size_t n) noexcept nogil:
    """encap.flow_port: 49152 + 14 bits of CRC-32 over the MACs and ethertype, then the
    inner IP addresses and L4 ports (bytes 26 to 38, as far as the frame goes). n >= 14."""
    cdef unsigned long c = crc32(0, f, 14)
    if n > 26:
        c = crc32(c, f + 26, <unsigned int>(12 if n >= 38 else n - 26))
    return 49152 | (<uint32_t>c & 0x3FFF)


cdef int tx_offload(tx_pkt *p, const uint8_t *raw, size_t n) noexcept nogil:
    """Read the virtio-net header of a TAP read into p (datapath/gso.py `complete`); 0 when
    the Python path must handle it (what it cannot segment, it counts as malformed)."""
    cdef int flags, gso
    cdef size_t start, off, ihl, thl, f_n
    cdef const uint8_t *f
    if n < VNET_LEN + 14:
        return 0
    flags = raw[0]
    gso = raw[1] & ~VNET_GSO_ECN
    f = raw + VNET_LEN
    f_n = n - VNET_LEN
    p.data = f
    p.len = f_n
    if gso == VNET_GSO_NONE:
        if flags & VNET_NEEDS_CSUM:
            start = raw[6] | (<size_t>raw[7] << 8)
            off = raw[8] | (<size_t>raw[9] << 8)
            if start + off + 2 > f_n:
                return 0
            p.csum_start = <int>start
            p.csum_at = <int>(start + off)
        return 1
    if gso != VNET_GSO_TCPV4:
        return 0
    p.mss = raw[4] | (<size_t>raw[5] << 8)
    # segment_tcp4's checks: TCP over IPv4, whole headers, some payload.
    if p.mss == 0 or f_n < 14 + 20 + 20 or f[12] != 0x08 or f[13] != 0 or f[23] != 6:
        return 0
    if f[14] >> 4 != 4:
        return 0
    ihl = (f[14] & 0x0F) * 4
    p.l4 = 14 + ihl
    if ihl < 20 or p.l4 + 20 > f_n:
        return 0
    thl = (f[p.l4 + 12] >> 4) * 4
    p.hlen = p.l4 + thl
    if thl < 20 or p.hlen >= f_n:
        return 0
    if (f_n - p.hlen + p.mss - 1) // p.mss > GSO_MAX_SEGMENTS:
        return 0                      # gso.MAX_SEGMENTS: refused as malformed
    p.nseg = <int>((f_n - p.hlen + p.mss - 1) // p.mss)
    return 1


cdef void tx_classify(RxTable t, tx_pkt *p, int in_port, int in_bridge) noexcept nogil:
    """The bridge's decision for one frame from a VM port, from the installed tables
    only: TX_CANDIDATE (with p.tun) or TX_MISS."""
    cdef const uint8_t *f = p.data
    cdef size_t n = p.len, largest
    cdef int e = -1, out, k
    p.kind = TX_MISS
    p.src_entry = -1
    if n < 14:
        return                        # malformed: counted by the Python path
    if f[12] == 0x81 and f[13] == 0x00:
        return                        # VLAN-tagged: the bridge's VLAN rules
    if f[12] == 0x08 and f[13] == 0x06:
        return                        # ARP: the tunnel layer snoops it
    if not (f[6] & 1):
        # The bridge learns the sender: only an entry already on this port is a no-op.
        if t.lookup(in_bridge, f + 6, &e) != in_port:
            return
        p.src_entry = e
    if f[0] & 1:
        return                        # broadcast, multicast: flooded by the Python path
    out = t.lookup(in_bridge, f, &e)
    if out < 0 or out == in_port or out >= t.ntx_ports:
        return
    k = t.tun_of_port[out]
    largest = p.hlen + p.mss if p.mss else n
    if k < 0 or largest > t.tuns[k].max_frame:
        return                        # not a fast tunnel; or too big: ICMP or fragments
    p.tun = k
    p.kind = TX_CANDIDATE


cdef inline size_t tx_seg_len(const tx_pkt *p, int j) noexcept nogil:
    """The length of the j-th inner frame `p` stands for."""
    cdef size_t rest
    if not p.mss:
        return p.len
    rest = p.len - p.hlen - <size_t>j * p.mss
    return p.hlen + (p.mss if rest > p.mss else rest)


cdef void tx_inner(const tx_pkt *p, int j, uint8_t *d) noexcept nogil:
    """Write the j-th inner frame of `p` at d (tx_seg_len bytes): the frame with its partial
    checksum completed, or a TCP segment (gso.segment_tcp4, byte for byte)."""
    cdef const uint8_t *f = p.data
    cdef size_t l4 = p.l4, seglen, piece, tcp_len
    cdef uint32_t v, c
    cdef uint64_t s
    cdef int flags
    if not p.mss:
        memcpy(d, f, p.len)
        if p.csum_start >= 0:
            c = csum_fold(ones_sum(d + p.csum_start, p.len - <size_t>p.csum_start, 0))
            d[p.csum_at] = <uint8_t>(c >> 8)
            d[p.csum_at + 1] = <uint8_t>c
        return
    seglen = tx_seg_len(p, j)
    piece = seglen - p.hlen
    memcpy(d, f, p.hlen)
    memcpy(d + p.hlen, f + p.hlen + <size_t>j * p.mss, piece)
    tcp_len = seglen - l4
    v = <uint32_t>(l4 - 14 + tcp_len)           # IPv4 total length
    d[16] = <uint8_t>(v >> 8)
    d[17] = <uint8_t>v
    v = ((<uint32_t>f[18] << 8 | f[19]) + <uint32_t>j) & 0xFFFF
    d[18] = <uint8_t>(v >> 8)
    d[19] = <uint8_t>v
    d[24] = 0
    d[25] = 0
    c = csum_fold(ones_sum(d + 14, l4 - 14, 0))
    d[24] = <uint8_t>(c >> 8)
    d[25] = <uint8_t>c
    put32(d + l4 + 4, get32(f + l4 + 4) + <uint32_t>(<size_t>j * p.mss))
    flags = f[l4 + 13]
    if j != p.nseg - 1:
        flags &= ~0x09                          # FIN, PSH: the last segment's
    if j:
        flags &= ~0x80                          # CWR: the first segment's
    d[l4 + 13] = <uint8_t>flags
    d[l4 + 16] = 0
    d[l4 + 17] = 0
    # The pseudo header: addresses, protocol, TCP length.
    s = ones_sum(d + 26, 8, 6 + <uint64_t>tcp_len)
    c = csum_fold(ones_sum(d + l4, tcp_len, s))
    d[l4 + 16] = <uint8_t>(c >> 8)
    d[l4 + 17] = <uint8_t>c


cdef inline size_t tx_capacity(const tx_tun *k, size_t inner) noexcept nogil:
    """The outer frame's length for an inner frame of `inner` bytes."""
    if k.sa == NULL:
        return k.hlen + k.enc_len + inner
    return k.hlen + esp_sealed_len(k.sa, k.enc_len + inner)


cdef inline void tx_encap(const tx_tun *k, const tx_pkt *p, int j, size_t inner,
                          uint8_t *pl, uint32_t *fport) noexcept nogil:
    """The encapsulation's push at pl (encap.Vxlan/Geneve/Gre.push): UDP and the 8-byte
    VXLAN or Geneve header, or the GRE header; then the j-th inner frame of p. Over IPv6
    the UDP checksum as the underlay's `l4` computes it; over IPv4 it stays 0. `*fport`:
    the UDP source port (encap.flow_port), computed when 0: the segments of one TCP
    super-frame share it (the bytes it hashes are their common headers)."""
    cdef uint32_t c
    cdef size_t ulen
    tx_inner(p, j, pl + k.enc_len)
    if k.proto != 17:
        memcpy(pl, k.enc_head, k.enc_len)
        return
    ulen = 16 + inner
    if fport[0] == 0:
        fport[0] = flow_port(pl + 16, inner)
    put32(pl, (fport[0] << 16) | k.dport)
    put32(pl + 4, <uint32_t>ulen << 16)
    memcpy(pl + 8, k.enc_head, 8)
    if k.v6:
        c = csum_fold(ones_sum(pl, ulen, k.csum_base + ulen))
        if c == 0:
            c = 0xFFFF                # 0 means "no checksum" (RFC 768)
        pl[6] = <uint8_t>(c >> 8)
        pl[7] = <uint8_t>c


cdef inline size_t tx_outer(const tx_tun *k, uint8_t *o, size_t payload,
                            uint32_t ident) noexcept nogil:
    """underlay.header at o: the tunnel's Ethernet + IP template completed for `payload`
    bytes after it (IPv4: total length, `ident`, checksum; IPv6: payload length);
    returns the frame's length."""
    cdef size_t total = 20 + payload
    cdef uint32_t s = k.csum_base + <uint32_t>total + ident
    memcpy(o, k.head, k.hlen)
    if k.v6:
        o[18] = <uint8_t>(payload >> 8)
        o[19] = <uint8_t>payload
        return 54 + payload
    o[16] = <uint8_t>(total >> 8)
    o[17] = <uint8_t>total
    o[18] = <uint8_t>(ident >> 8)
    o[19] = <uint8_t>ident
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    o[24] = <uint8_t>(s >> 8)
    o[25] = <uint8_t>s
    return 14 + total


cdef Py_ssize_t tx_run(RxTable t, tx_pkt *pkts, Py_ssize_t i, Py_ssize_t n,
                       uint8_t **bufs, size_t *lens, int *results, uint64_t *seq,
                       int *acct_tun, int *account, int *cut) noexcept nogil:
    """Build the frames of pkts[i:n] in order, from where the last call stopped: stops
    after a packet whose SA needs the slow path's lifetime accounting (`*seq` is its
    sequence number, `*acct_tun` its tunnel), or after OpenSSL failed (`*cut` set, the
    read's kind still TX_CANDIDATE). After the first miss, every later read is a miss too (`*cut`):
    the Python path sends it after this batch's hits, so each port's output stays in
    arrival order. Output slot `first + j` gets the j-th frame: the outer frame in
    bufs[slot] (lens[slot] bytes, result 0), or result -1-DropReason / ERR_*."""
    cdef tx_pkt *p
    cdef tx_tun *k
    cdef uint8_t *o
    cdef uint8_t *pl
    cdef size_t inner, plen, esp_len = 0, total
    cdef uint32_t s, ident
    cdef Py_ssize_t slot
    cdef int r
    cdef uint64_t sq = 0
    cdef uint32_t fport
    account[0] = 0
    while i < n:
        p = &pkts[i]
        if cut[0] or p.kind != TX_CANDIDATE:
            p.kind = TX_MISS
            cut[0] = 1
            i += 1
            continue
        k = &t.tuns[p.tun]
        fport = 0
        if k.sa == NULL:
            # A clear tunnel: Clear.protect; over IPv4 the ID from the underlay's counter.
            while p.done < p.nseg:
                slot = p.first + p.done
                o = bufs[slot]
                inner = tx_seg_len(p, p.done)
                tx_encap(k, p, p.done, inner, o + k.hlen, &fport)
                if not k.v6:
                    k.ident[0] = <uint16_t>(k.ident[0] + 1)
                lens[slot] = tx_outer(k, o, k.enc_len + inner, k.ident[0])
                results[slot] = 0
                p.done += 1
            p.kind = TX_TAKEN
            i += 1
            continue
        while p.done < p.nseg:
            slot = p.first + p.done
            o = bufs[slot]
            inner = tx_seg_len(p, p.done)
            plen = k.enc_len + inner
            # The encapsulated frame where ESP's payload goes, sealed in place.
            pl = o + k.hlen + 8 + k.sa.iv_len
            tx_encap(k, p, p.done, inner, pl, &fport)
            pthread_mutex_lock(&k.sa.lock)
            r = esp_seal(k.sa, pl, plen, k.proto, NULL, o + k.hlen,
                         tx_capacity(k, inner) - k.hlen, &esp_len, &sq, account)
            pthread_mutex_unlock(&k.sa.lock)
            results[slot] = r
            p.done += 1
            if r == 0:
                # The ID of an ESP packet (DF set, RFC 6864) is its sequence number's low
                # 16 bits.
                lens[slot] = tx_outer(k, o, esp_len, <uint32_t>(sq & 0xFFFF))
            elif r <= ERR_CAPACITY:
                cut[0] = 1
                return i              # the caller raises: OpenSSL refused a call
            if account[0]:
                seq[0] = sq
                acct_tun[0] = p.tun
                if p.done == p.nseg:
                    p.kind = TX_TAKEN
                    i += 1
                return i
        p.kind = TX_TAKEN
        i += 1
    return i


def tx_burst(RxTable table, frames, int in_port, int in_bridge, bint vnet=False):
    """Run reads from port index `in_port` (of bridge index `in_bridge`) through `table`'s
    transmit side; the GIL is released for the per-packet work. With `vnet`, each read
    starts with a virtio-net header (a TAP with offloads: see datapath/gso.py).

    Returns `(kinds, outputs, written, tunnel_tx, drops, entries, taken)`: `kinds` one
    byte per read (0 miss, 3 taken); `outputs` {NIC port index: [outer frame, ...]} in
    arrival order, for ports without an installed output; `written` {NIC port index:
    (bytes, (sent, dropped, too big))} for ports with one, already sent;
    `tunnel_tx` {tunnel port index: [packets, inner bytes]}; `drops` of (read index,
    tunnel port index, DropReason); `entries` the set of MAC entry indices whose age to
    refresh (the inner sources, the internal ports' MACs on the egress bridges); `taken`
    [frames, bytes] the input port received (segments counted one by one).
    """
    return _tx_burst(table, frames, in_port, in_bridge, vnet, NULL)


cdef bint tx_countable(RxTable t, const tx_pkt *pkts, Py_ssize_t n, const int *results,
                       const loop_acct *a) noexcept nogil:
    """Whether tx_burst's batch is one the FastLoop counts itself: every read taken, every
    segment sealed and for an installed output, every index inside what the loop counts."""
    cdef Py_ssize_t i, j
    cdef const tx_pkt *p
    cdef const tx_tun *k
    if n == 0:
        return 0
    for i in range(n):
        p = &pkts[i]
        if p.kind != TX_TAKEN:
            return 0
        k = &t.tuns[p.tun]
        if (not out_direct(t, k.out_port) or not acct_port(a, k.out_port)
                or not acct_port(a, k.port) or not acct_entry(a, p.src_entry)
                or not acct_entry(a, k.phy_entry)):
            return 0
        for j in range(p.nseg):
            if results[p.first + j] != 0:
                return 0
    return 1


cdef void tx_count(RxTable t, loop_acct *a, const tx_pkt *pkts, Py_ssize_t n,
                   int in_port) noexcept nogil:
    """FastTables._transmit's counts for a batch `tx_countable` accepted (the writes are
    counted by acct_written)."""
    cdef Py_ssize_t i, j
    cdef const tx_pkt *p
    cdef const tx_tun *k
    cdef uint64_t segs = 0, nbytes = 0, inner
    for i in range(n):
        p = &pkts[i]
        k = &t.tuns[p.tun]
        for j in range(p.nseg):
            inner = tx_seg_len(p, <int>j)
            segs += 1
            nbytes += inner
            acct_add(a, k.port, C_TX_PACKETS, 1, inner)
        acct_touch(a, p.src_entry)
        acct_touch(a, k.phy_entry)
    acct_add(a, in_port, C_RX_PACKETS, segs, nbytes)
    a.tx_hits += segs
    a.batches += 1


cdef object _tx_burst(RxTable table, frames, int in_port, int in_bridge, bint vnet,
                      loop_acct *acct):
    """tx_burst; with `acct` (the FastLoop's), a batch `tx_countable` accepts whose writes
    were all clean is counted into *acct and gives None instead of the result."""
    cdef Py_ssize_t n = len(frames), i, j, done, nout = 0, slot
    cdef dict prewritten = None
    cdef tx_pkt *pkts
    cdef Py_buffer *views
    cdef Py_ssize_t nviews = 0
    cdef uint8_t *arena = NULL
    cdef uint8_t **bufs = NULL
    cdef size_t *lens = NULL
    cdef int *results = NULL
    cdef int *slot_port = NULL
    cdef tx_pkt *p
    cdef tx_tun *k
    cdef int account = 0, cut = 0, r, acct_tun = 0
    cdef uint64_t seq = 0
    cdef size_t cap, inner, raw_len, total = 0
    cdef const uint8_t *raw
    # The result's objects are made only for a batch the loop does not count itself.
    cdef bytearray kinds
    cdef list drops, taken
    cdef dict outputs, tunnel_tx, written = None
    cdef set entries
    pkts = <tx_pkt *>calloc(n if n else 1, sizeof(tx_pkt))
    views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
    try:
        if pkts == NULL or views == NULL:
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(frames[i], &views[i], PyBUF_SIMPLE)
            nviews = i + 1
        with nogil:
            for i in range(n):
                p = &pkts[i]
                raw = <const uint8_t *>views[i].buf
                raw_len = <size_t>views[i].len
                p.csum_start = -1
                p.nseg = 1
                p.data = raw
                p.len = raw_len
                if raw_len > MAX_PACKET or (vnet and not tx_offload(p, raw, raw_len)):
                    p.kind = TX_MISS
                else:
                    tx_classify(table, p, in_port, in_bridge)
                if p.kind == TX_CANDIDATE:
                    p.first = nout
                    nout += p.nseg
        bufs = <uint8_t **>calloc(nout if nout else 1, sizeof(uint8_t *))
        lens = <size_t *>calloc(nout if nout else 1, sizeof(size_t))
        results = <int *>calloc(nout if nout else 1, sizeof(int))
        slot_port = <int *>calloc(nout if nout else 1, sizeof(int))
        if bufs == NULL or lens == NULL or results == NULL or slot_port == NULL:
            raise MemoryError()
        # One buffer for every outer frame of the batch: what leaves through an installed
        # output is sent from here, everything else is copied into bytes.
        for i in range(n):
            p = &pkts[i]
            if p.kind == TX_CANDIDATE:
                for j in range(p.nseg):
                    cap = tx_capacity(&table.tuns[p.tun], tx_seg_len(p, <int>j))
                    lens[p.first + j] = cap
                    total += SLOT(cap)
        arena = <uint8_t *>malloc(total if total else 1)
        if arena == NULL:
            raise MemoryError()
        total = 0
        for slot in range(nout):
            bufs[slot] = arena + total
            total += SLOT(lens[slot])
            POISON(bufs[slot] + lens[slot], SLOT(lens[slot]) - lens[slot])
            slot_port[slot] = -1
        i = 0
        while i < n:
            with nogil:
                done = tx_run(table, pkts, i, n, bufs, lens, results, &seq, &acct_tun,
                              &account, &cut)
            if account:
                (<SaCore>table._tx_cores[acct_tun])._account(seq)
            elif done < n and pkts[done].kind == TX_CANDIDATE:
                raise RuntimeError("OpenSSL failed to seal a packet")
            i = done
        if acct != NULL and tx_countable(table, pkts, n, results, acct):
            for i in range(n):
                p = &pkts[i]
                for j in range(p.nseg):
                    slot_port[p.first + j] = table.tuns[p.tun].out_port
            prewritten = write_direct(table, <const uint8_t **>bufs, lens, slot_port, nout)
            if acct_written(acct, prewritten):
                tx_count(table, acct, pkts, n, in_port)
                return None
            written = prewritten      # a write was not clean: Python counts it all
        kinds = bytearray(n)
        drops, outputs, tunnel_tx, entries, taken = [], {}, {}, set(), [0, 0]
        if written is None:
            written = {}
        for i in range(n):
            p = &pkts[i]
            kinds[i] = p.kind
            if p.kind == TX_MISS:
                continue
            if p.src_entry >= 0:
                entries.add(p.src_entry)
            k = &table.tuns[p.tun]
            for j in range(p.nseg):
                slot = p.first + j
                inner = tx_seg_len(p, <int>j)
                taken[0] += 1
                taken[1] += inner
                r = results[slot]
                if r != 0:
                    drops.append((i, k.port, _REASONS[-1 - r]))
                    continue
                entries.add(k.phy_entry)
                tx = tunnel_tx.get(k.port)
                if tx is None:
                    tunnel_tx[k.port] = [1, inner]
                else:
                    tx[0] += 1
                    tx[1] += inner
                if prewritten is None:
                    slot_port[slot] = hand_out(table, outputs, written, k.out_port,
                                               bufs[slot], lens[slot])
        if prewritten is None:
            write_written(table, written, <const uint8_t **>bufs, lens, slot_port, nout)
        return kinds, outputs, written, tunnel_tx, drops, entries, taken
    finally:
        for i in range(nviews):
            PyBuffer_Release(&views[i])
        free(pkts)
        free(views)
        free(arena)
        free(bufs)
        free(lens)
        free(results)
        free(slot_port)


# -- batched transmission ----------------------------------------------------------------------

cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #define ESP_MMSG 64
    /* Send n buffers on a connected or bound socket, ESP_MMSG per sendmmsg(2) call;
       errs[i] = 0 when the i-th was sent, else its errno (it is skipped). */
    static void esp_send_frames(int fd, char **bufs, const size_t *lens, int n, int *errs)
    {
        struct mmsghdr msgs[ESP_MMSG];
        struct iovec iov[ESP_MMSG];
        int i = 0, k, m, r;
        while (i < n) {
            m = n - i > ESP_MMSG ? ESP_MMSG : n - i;
            memset(msgs, 0, sizeof(msgs[0]) * (size_t)m);
            for (k = 0; k < m; k++) {
                iov[k].iov_base = bufs[i + k];
                iov[k].iov_len = lens[i + k];
                msgs[k].msg_hdr.msg_iov = &iov[k];
                msgs[k].msg_hdr.msg_iovlen = 1;
            }
            r = sendmmsg(fd, msgs, (unsigned int)m, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                errs[i++] = errno;   /* the first message failed: skip it, go on */
                continue;
            }
            for (k = 0; k < r; k++)
                errs[i + k] = 0;
            i += r;
        }
    }
    """
    void esp_send_frames(int fd, char **bufs, const size_t *lens, int n, int *errs) nogil
    const int EMSGSIZE_ "EMSGSIZE"


# -- receive-side coalescing for TAP writes (datapath/gro.py, in C) ----------------------------
#
# `gro_units` finds, in a batch of frames for one TAP, the runs gro.coalesce merges (the
# same rules: Linux's tcp_gro_receive); `tap_send` writes each run as one frame with a
# virtio-net header, gathering the first frame's headers and every segment's payload with
# writev(2) (nothing is copied), and `gro_coalesce` builds the same as bytes, for the tests
# that hold it to gro.coalesce.

cdef enum:
    GRO_MAX = 65535 - 20 - 60     # gro.MAX_GSO

cdef struct gro_unit:
    Py_ssize_t first      # index of its first frame
    int count             # frames merged (1: written as it is)
    int hlen
    int psh
    size_t mss            # the first segment's payload
    size_t size           # payload bytes


cdef inline int gro_segment(const uint8_t *f, size_t n, size_t *hlen) noexcept nogil:
    """gro._segment: whether f is a mergeable TCP/IPv4 frame (its header length in hlen)."""
    cdef size_t thl
    if n < 54 or f[12] != 0x08 or f[13] != 0 or f[14] != 0x45 or f[23] != 6:
        return 0
    if (f[20] & 0x3F) or f[21]:
        return 0
    if 14 + ((<size_t>f[16] << 8) | f[17]) != n:
        return 0
    thl = (f[46] >> 4) * 4
    hlen[0] = 34 + thl
    if thl < 20 or hlen[0] >= n or (f[47] & ~0x08) != 0x10:
        return 0
    return 1


cdef inline int gro_same_flow(const uint8_t *a, size_t ha, const uint8_t *b,
                              size_t hb) noexcept nogil:
    """gro._segment's key equality: Ethernet and the IP fields the merged header keeps,
    addresses and ports, ACK number, window and options."""
    if ha != hb:
        return 0
    return (memcmp(a, b, 16) == 0 and a[20] == b[20] and a[22] == b[22]
            and memcmp(a + 26, b + 26, 12) == 0 and memcmp(a + 42, b + 42, 4) == 0
            and memcmp(a + 48, b + 48, 2) == 0 and memcmp(a + 54, b + 54, ha - 54) == 0)


cdef Py_ssize_t gro_plan(const uint8_t **fs, const size_t *ns, Py_ssize_t n,
                         gro_unit *units) noexcept nogil:
    """gro.coalesce's runs, as units; returns how many."""
    cdef Py_ssize_t i, nu = 0
    cdef size_t hlen = 0, plen, run_hlen = 0
    cdef uint32_t seq, run_next = 0
    cdef int closed = 0, seg, in_run = 0
    cdef gro_unit *u = NULL
    for i in range(n):
        seg = gro_segment(fs[i], ns[i], &hlen)
        if seg:
            plen = ns[i] - hlen
            seq = get32(fs[i] + 38)
            if (in_run and not closed and gro_same_flow(fs[u.first], run_hlen, fs[i], hlen)
                    and seq == run_next and plen <= u.mss and u.size + plen <= GRO_MAX):
                u.count += 1
                u.size += plen
                run_next = seq + <uint32_t>plen
                u.psh = 1 if fs[i][47] & 0x08 else 0
                # A short segment or a PSH ends what can follow (tcp_gro_receive's rule).
                closed = plen < u.mss or u.psh
                continue
        if not seg:
            u = &units[nu]
            nu += 1
            u.first = i
            u.count = 1
            u.hlen = 0
            in_run = 0
            continue
        u = &units[nu]
        nu += 1
        u.first = i
        u.count = 1
        u.hlen = <int>hlen
        u.mss = plen
        u.size = plen
        u.psh = 1 if fs[i][47] & 0x08 else 0
        run_hlen = hlen
        run_next = seq + <uint32_t>plen
        closed = u.psh
        in_run = 1
    return nu


cdef inline uint32_t fold2(uint32_t s) noexcept nogil:
    """gro._fold: two end-around carries."""
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


cdef void gro_header(const gro_unit *u, const uint8_t *first, uint8_t *hdr,
                     uint8_t *vnet) noexcept nogil:
    """gro._merge: the merged frame's headers (u.hlen bytes) and its virtio-net header."""
    cdef uint32_t total = <uint32_t>(u.hlen - 14 + u.size), s = 0
    cdef int k
    memcpy(hdr, first, u.hlen)
    hdr[16] = <uint8_t>(total >> 8)
    hdr[17] = <uint8_t>total
    hdr[24] = 0
    hdr[25] = 0
    for k in range(10):
        s += (<uint32_t>hdr[14 + 2 * k] << 8) | hdr[15 + 2 * k]
    s = ~fold2(s) & 0xFFFF
    hdr[24] = <uint8_t>(s >> 8)
    hdr[25] = <uint8_t>s
    if u.psh:
        hdr[47] |= 0x08
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
    s = 0
    for k in range(4):
        s += (<uint32_t>hdr[26 + 2 * k] << 8) | hdr[27 + 2 * k]
    s = fold2(s + 6 + total - 20)
    hdr[50] = <uint8_t>(s >> 8)
    hdr[51] = <uint8_t>s
    # virtio_net_hdr: NEEDS_CSUM, GSO TCPv4, hdr_len, gso_size, csum_start 34, offset 16.
    vnet[0] = 1
    vnet[1] = 1
    vnet[2] = <uint8_t>u.hlen
    vnet[3] = <uint8_t>(u.hlen >> 8)
    vnet[4] = <uint8_t>u.mss
    vnet[5] = <uint8_t>(u.mss >> 8)
    vnet[6] = 34
    vnet[7] = 0
    vnet[8] = 16
    vnet[9] = 0


cdef class _Frames:
    """Buffer views of a list of frames, released with the object."""
    cdef Py_buffer *views
    cdef const uint8_t **fs
    cdef size_t *ns
    cdef Py_ssize_t n, nviews

    def __cinit__(self, frames):
        cdef Py_ssize_t i
        self.n = len(frames)
        self.nviews = 0
        self.views = <Py_buffer *>calloc(self.n if self.n else 1, sizeof(Py_buffer))
        self.fs = <const uint8_t **>calloc(self.n if self.n else 1, sizeof(uint8_t *))
        self.ns = <size_t *>calloc(self.n if self.n else 1, sizeof(size_t))
        if self.views == NULL or self.fs == NULL or self.ns == NULL:
            raise MemoryError()
        for i in range(self.n):
            PyObject_GetBuffer(frames[i], &self.views[i], PyBUF_SIMPLE)
            self.nviews = i + 1
            self.fs[i] = <const uint8_t *>self.views[i].buf
            self.ns[i] = <size_t>self.views[i].len

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.views != NULL:
            for i in range(self.nviews):
                PyBuffer_Release(&self.views[i])
        free(self.views)
        free(self.fs)
        free(self.ns)


def gro_coalesce(frames) -> list:
    """gro.coalesce, in C: [(virtio-net header, frame, frames merged), ...]."""
    cdef _Frames fr = _Frames(frames)
    cdef gro_unit *units = <gro_unit *>calloc(fr.n if fr.n else 1, sizeof(gro_unit))
    cdef Py_ssize_t nu, i, j
    cdef gro_unit *u
    cdef bytearray vnet, out
    cdef uint8_t *o
    cdef size_t off, plen
    cdef list result = []
    if units == NULL:
        raise MemoryError()
    try:
        nu = gro_plan(fr.fs, fr.ns, fr.n, units)
        for i in range(nu):
            u = &units[i]
            if u.count == 1:
                result.append((bytes(10), frames[u.first], 1))
                continue
            vnet = bytearray(10)
            out = bytearray(u.hlen + u.size)
            o = <uint8_t *>(<char *>out)
            gro_header(u, fr.fs[u.first], o, <uint8_t *>(<char *>vnet))
            off = u.hlen
            for j in range(u.first, u.first + u.count):
                plen = fr.ns[j] - (<size_t>u.hlen)
                memcpy(o + off, fr.fs[j] + u.hlen, plen)
                off += plen
            result.append((bytes(vnet), bytes(out), u.count))
        return result
    finally:
        free(units)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<errno.h>" nogil:
    int errno
    const int EINTR


cdef Py_ssize_t tap_write(int fd, const uint8_t **fs, const size_t *ns, Py_ssize_t n,
                          gro_unit *units, iovec *iov, int *errs) noexcept nogil:
    """Write fs[i][0:ns[i]] to the TAP `fd`, consecutive TCP segments merged (gro_plan),
    each write gathered with writev(2) (nothing is copied); returns the number of units,
    errs[u] the errno of unit u (0: written). `iov` has room for n + 2 entries."""
    cdef uint8_t hdr[128]
    cdef uint8_t vnet[10]
    cdef uint8_t none[10]
    cdef Py_ssize_t nu, i, j
    cdef int cnt
    cdef ssize_t r
    cdef gro_unit *u
    memset(none, 0, 10)
    nu = gro_plan(fs, ns, n, units)
    for i in range(nu):
        u = &units[i]
        if u.count == 1:
            iov[0].iov_base = none
            iov[0].iov_len = 10
            iov[1].iov_base = <void *>fs[u.first]
            iov[1].iov_len = ns[u.first]
            cnt = 2
        else:
            # hlen <= 34 + 60: the header fits.
            gro_header(u, fs[u.first], hdr, vnet)
            iov[0].iov_base = vnet
            iov[0].iov_len = 10
            iov[1].iov_base = hdr
            iov[1].iov_len = u.hlen
            cnt = 2
            for j in range(u.first, u.first + u.count):
                iov[cnt].iov_base = <void *>(fs[j] + u.hlen)
                iov[cnt].iov_len = ns[j] - <size_t>u.hlen
                cnt += 1
        while True:
            r = writev(fd, iov, cnt)
            if r >= 0 or errno != EINTR:
                break
        errs[i] = 0 if r >= 0 else errno
    return nu


cdef tuple write_frames(int kind, int fd, const uint8_t **fs, const size_t *ns,
                        Py_ssize_t n):
    """Write the frames fs[i][0:ns[i]] as TapDevice.send (OUT_TAP) or
    PacketSocketDevice.send (OUT_PACKET) does, the GIL released; returns (sent, lengths
    dropped, lengths too big), counted per original frame as they count."""
    cdef gro_unit *units = NULL
    cdef iovec *iov = NULL
    cdef int *errs = NULL
    cdef gro_unit *u
    cdef Py_ssize_t nu, i
    cdef int sent = 0
    cdef size_t merged
    cdef list dropped = [], too_big = []
    if n > 0x7FFFFFFF:
        raise ValueError("too many frames")
    errs = <int *>calloc(n if n else 1, sizeof(int))
    if kind == OUT_TAP:
        units = <gro_unit *>calloc(n if n else 1, sizeof(gro_unit))
        iov = <iovec *>calloc(n + 2, sizeof(iovec))
    try:
        if errs == NULL or (kind == OUT_TAP and (units == NULL or iov == NULL)):
            raise MemoryError()
        if kind == OUT_TAP:
            with nogil:
                nu = tap_write(fd, fs, ns, n, units, iov, errs)
            for i in range(nu):
                u = &units[i]
                if errs[i] == 0:
                    sent += u.count
                    continue
                merged = ns[u.first] if u.count == 1 else u.hlen + u.size
                (too_big if errs[i] == EMSGSIZE_ else dropped).extend(
                    [merged // u.count] * u.count)
        elif kind == OUT_PACKET:
            with nogil:
                esp_send_frames(fd, <char **>fs, ns, <int>n, errs)
            for i in range(n):
                if errs[i] == 0:
                    sent += 1
                elif errs[i] == EMSGSIZE_:
                    too_big.append(ns[i])
                else:
                    dropped.append(ns[i])
        else:
            raise ValueError("unknown output kind")
        return sent, dropped, too_big
    finally:
        free(units)
        free(iov)
        free(errs)


def tap_send(int fd, frames) -> tuple:
    """TapDevice.send in C: every frame written to the TAP `fd`, consecutive TCP segments
    merged (gro.coalesce), each write gathered with writev(2); returns (sent, lengths
    dropped, lengths too big), counted per original frame as TapDevice.send does."""
    cdef _Frames fr = _Frames(frames)
    return write_frames(OUT_TAP, fd, fr.fs, fr.ns, fr.n)


def send_frames(int fd, frames) -> tuple:
    """Send every frame on socket `fd` with sendmmsg(2), the GIL released; returns
    (sent, lengths dropped, lengths too big for the link), as devices._send_all."""
    cdef _Frames fr = _Frames(frames)
    return write_frames(OUT_PACKET, fd, fr.fs, fr.ns, fr.n)


cdef tuple write_port(RxTable t, int port, const uint8_t **fs, const size_t *ns,
                      Py_ssize_t n):
    """write_frames to port index `port`'s installed output, with the byte total its
    `send` counts: (bytes, (sent, dropped, too big))."""
    cdef Py_ssize_t i
    cdef size_t nbytes = 0
    for i in range(n):
        nbytes += ns[i]
    return nbytes, write_frames(t.out_kind[port], t.out_fd[port], fs, ns, n)


cdef inline bint out_direct(RxTable t, int port) noexcept nogil:
    return 0 <= port < t.nouts and t.out_kind[port] != OUT_PYTHON


cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read"(int fd, void *buf, size_t count)


def tap_read(int fd, Py_ssize_t limit, Py_ssize_t size) -> list:
    """TapDevice.recv_raw in C: up to `limit` reads of at most `size` bytes from `fd`, each
    read(2) straight into the bytes object it returns (one copy, no Python loop); stops
    at the first read that fails (EAGAIN: nothing more)."""
    cdef list out = []
    cdef PyObject *b
    cdef char *buf
    cdef ssize_t r
    cdef Py_ssize_t i
    if size <= 0:
        raise ValueError("size must be positive")
    for i in range(limit):
        b = _bytes_new(NULL, size)
        if b == NULL:
            raise MemoryError()
        buf = _bytes_buf(b)
        with nogil:
            while True:
                r = c_read(fd, buf, <size_t>size)
                if r >= 0 or errno != EINTR:
                    break
        if r < 0:
            _decref(b)
            break
        if _PyBytes_Resize(&b, <Py_ssize_t>r) < 0:
            raise MemoryError()
        out.append(<object>b)
        _decref(b)
    return out


# -- the AF_PACKET receive ring (TPACKET_V2), read in C ------------------------------------------

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t esp_ring_status(const uint8_t *p) {
        return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void esp_ring_release(uint8_t *p) {
        __atomic_store_n((uint32_t *)p, 0u, __ATOMIC_RELEASE);   /* TP_STATUS_KERNEL */
    }
    static inline uint32_t esp_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline uint16_t esp_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    """
    uint32_t esp_ring_status(const uint8_t *p) nogil
    void esp_ring_release(uint8_t *p) nogil
    uint32_t esp_u32(const uint8_t *p) nogil
    uint16_t esp_u16(const uint8_t *p) nogil


cdef class RingBatch:
    """Frames taken from a TPACKET_V2 receive ring and still in their slots (zero copy):
    `rx_burst` reads them where the kernel wrote them, and only what Python must see is
    copied out (`copies`, `copy_all`, `batch[i]`). `release()` hands the slots back to the
    kernel; until then the kernel does not write them again. A frame with VLAN metadata is
    the one copied at once (its tag put back, as `ring_read` does).

    Made by `ring_take`; `len(batch)` frames, `head` the slot to read next, `nbytes` their
    total length."""
    cdef Py_buffer view
    cdef bint has_view
    cdef uint8_t *base
    cdef Py_ssize_t frame_size
    cdef Py_ssize_t frame_nr
    cdef Py_ssize_t first       # the first slot taken
    cdef Py_ssize_t nslots      # slots taken (frames and unreadable ones), from `first`
    cdef Py_ssize_t n
    cdef const uint8_t **fs
    cdef size_t *ns
    cdef list held              # the copies of frames with VLAN metadata
    cdef readonly Py_ssize_t head
    cdef readonly Py_ssize_t nbytes

    def __cinit__(self):
        self.has_view = 0
        self.fs = NULL
        self.ns = NULL
        self.n = 0
        self.nslots = 0
        self.held = []

    def __dealloc__(self):
        self._release()
        free(self.fs)
        free(self.ns)

    cdef void _release(self):
        cdef Py_ssize_t i, slot = self.first
        if not self.has_view:
            return
        for i in range(self.nslots):
            esp_ring_release(self.base + slot * self.frame_size)
            slot = slot + 1 if slot + 1 < self.frame_nr else 0
        self.nslots = 0
        self.n = 0
        PyBuffer_Release(&self.view)
        self.has_view = 0

    def release(self) -> None:
        """Hand every slot back to the kernel; the frames are gone (idempotent)."""
        self._release()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, Py_ssize_t i) -> bytes:
        if not 0 <= i < self.n:
            raise IndexError("ring batch index out of range")
        return PyBytes_FromStringAndSize(<const char *>self.fs[i], <Py_ssize_t>self.ns[i])

    def copy_all(self) -> list:
        """Every frame, as bytes."""
        return [self[i] for i in range(self.n)]

    def copies(self, kinds) -> list:
        """The frames whose entry in `kinds` (one byte per frame, rx_burst's) is 0, as
        bytes, in order: the misses for the Python path."""
        cdef const uint8_t[:] k = kinds
        cdef Py_ssize_t i
        if k.shape[0] != self.n:
            raise ValueError("one kind per frame")
        return [self[i] for i in range(self.n) if k[i] == 0]


def ring_take(ring, Py_ssize_t head, Py_ssize_t frame_size, Py_ssize_t frame_nr,
              Py_ssize_t limit) -> RingBatch:
    """Take up to `limit` frames from the TPACKET_V2 ring `ring` (a writable buffer of
    frame_nr slots of frame_size bytes) from slot `head`, leaving them in their slots (see
    RingBatch); a frame cut to its slot is dropped, and a slot whose header points outside
    it is skipped, both handed back with the rest on `release()`."""
    cdef RingBatch b = RingBatch()
    cdef uint8_t *slot
    cdef uint32_t status, length, snaplen
    cdef uint16_t mac, tci, tpid
    cdef PyObject *f
    cdef uint8_t *o
    if limit < 0:
        limit = 0
    PyObject_GetBuffer(ring, &b.view, PyBUF_WRITABLE)
    b.has_view = 1
    if frame_size < 32 or frame_nr <= 0 or frame_size * frame_nr > b.view.len:
        raise ValueError("the ring is smaller than its slots")
    if not 0 <= head < frame_nr:
        raise ValueError("head outside the ring")
    b.fs = <const uint8_t **>calloc(limit if limit else 1, sizeof(uint8_t *))
    b.ns = <size_t *>calloc(limit if limit else 1, sizeof(size_t))
    if b.fs == NULL or b.ns == NULL:
        raise MemoryError()
    b.base = <uint8_t *>b.view.buf
    b.frame_size = frame_size
    b.frame_nr = frame_nr
    b.first = head
    b.nbytes = 0
    # At most frame_nr slots: a full ring is taken once, never twice.
    while b.nslots < limit and b.nslots < frame_nr:
        slot = b.base + head * frame_size
        status = esp_ring_status(slot)
        if not status & 1:                          # TP_STATUS_USER
            break
        b.nslots += 1
        head = head + 1 if head + 1 < frame_nr else 0
        length = esp_u32(slot + 4)
        snaplen = esp_u32(slot + 8)
        mac = esp_u16(slot + 12)
        tci = esp_u16(slot + 24)
        tpid = esp_u16(slot + 26)
        # The kernel's header is trusted to be its own, but the frame stays in the slot.
        if (length != snaplen or <size_t>mac + snaplen > <size_t>frame_size
                or snaplen > 0xFFFF):
            continue
        if status & 0x10 and snaplen >= 12:         # TP_STATUS_VLAN_VALID
            if not status & 0x40 or not tpid:       # TP_STATUS_VLAN_TPID_VALID
                tpid = 0x8100
            f = _bytes_new(NULL, <Py_ssize_t>snaplen + 4)
            if f == NULL:
                raise MemoryError()
            o = <uint8_t *>_bytes_buf(f)
            memcpy(o, slot + mac, 12)
            o[12] = <uint8_t>(tpid >> 8)
            o[13] = <uint8_t>tpid
            o[14] = <uint8_t>(tci >> 8)
            o[15] = <uint8_t>tci
            memcpy(o + 16, slot + mac + 12, snaplen - 12)
            b.held.append(<object>f)
            _decref(f)
            b.fs[b.n] = o
            b.ns[b.n] = snaplen + 4
        else:
            b.fs[b.n] = slot + mac
            b.ns[b.n] = snaplen
        b.nbytes += b.ns[b.n]
        b.n += 1
    b.head = head
    return b


def ring_read(ring, Py_ssize_t head, Py_ssize_t frame_size, Py_ssize_t frame_nr,
              Py_ssize_t limit) -> tuple:
    """PacketSocketDevice.recv_batch's ring walk, in C: up to `limit` frames from the
    TPACKET_V2 ring `ring` (a writable buffer of frame_nr slots of frame_size bytes) from
    slot `head`, each slot handed back to the kernel once copied; a frame cut to the slot
    is dropped, a VLAN tag the kernel moved to metadata is put back. Returns (frames,
    next head). A slot whose header points outside it is handed back unread."""
    cdef RingBatch b = ring_take(ring, head, frame_size, frame_nr, limit)
    try:
        return b.copy_all(), b.head
    finally:
        b.release()


# -- the poll loop: epoll and whole batches without the interpreter (issue 10) -----------------
#
# espswitchd's EventLoop hands the loop its epoll set (every port's descriptor and the
# control plane's) and, for the NIC ports with a zero-copy receive ring and the VM ports
# with offloads that the tables install, what each descriptor is. `FastLoop.poll` then waits
# and runs those batches through `rx_burst` / `tx_burst` itself. A batch the pipeline took
# whole (every frame a hit written through an installed output, nothing dropped, missed or
# handed up) is finished here, without one Python object built for it: the burst adds the
# counters that FastTables would have added to the loop's C arrays (`loop_acct`; `fold`
# hands them to Python) instead of returning a result, and the loop goes on waiting.
# Anything else goes
# back to Python as it was: an event on a descriptor the loop does not run (the control
# plane, a port on the Python path, an error with nothing to read), or a batch with its
# burst result for FastTables to finish exactly as after its own burst. The loop returns
# when it has such work, at the deadline, when a signal interrupts the wait, or when the
# tables went out of date (`tables.current()` is false, asked after every burst: an SA's
# lifetime accounting, run from a burst, may have changed what is installed).

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/epoll.h>
    #include <time.h>
    #define ESP_LOOP_EVENTS 64
    /* epoll_wait(2) into two arrays (CPython's epoll registers data.fd = fd); returns the
       count, or -errno. */
    static int esp_epoll_wait(int epfd, int *fds, uint32_t *evs, int timeout_ms)
    {
        struct epoll_event ev[ESP_LOOP_EVENTS];
        int n = epoll_wait(epfd, ev, ESP_LOOP_EVENTS, timeout_ms), i;
        if (n < 0)
            return -errno;
        for (i = 0; i < n; i++) {
            fds[i] = ev[i].data.fd;
            evs[i] = ev[i].events;
        }
        return n;
    }
    /* time.monotonic(), as Python reads it on Linux. */
    static double esp_monotonic(void)
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    int esp_epoll_wait(int epfd, int *fds, uint32_t *evs, int timeout_ms) nogil
    double esp_monotonic() nogil
    const int ESP_LOOP_EVENTS
    const uint32_t EPOLLERR_ "EPOLLERR"
    const uint32_t EPOLLHUP_ "EPOLLHUP"

cdef enum:
    SOURCE_RING = 1
    SOURCE_TAP = 2

LOOP_RING = SOURCE_RING
LOOP_TAP = SOURCE_TAP


cdef class _Source:
    """One descriptor the loop runs: a NIC's receive ring, or a VM's TAP with offloads."""
    cdef int kind
    cdef int in_port
    cdef int in_bridge
    cdef object dev
    cdef object ring
    cdef Py_ssize_t frame_size
    cdef Py_ssize_t frame_nr
    cdef Py_ssize_t size
    cdef bint vnet


cdef class FastLoop:
    """The poll loop of espswitchd's datapath in C (see above). `configure` installs what
    each descriptor is, for one version of the tables; `poll` runs; `fold` returns and
    resets what the batches it finished counted. Counters refer to port and MAC entry
    indices of the tables `configure` saw: fold before the tables are rebuilt."""
    cdef RxTable table
    cdef object tables
    cdef int epfd
    cdef dict sources
    cdef loop_acct acct

    def __cinit__(self):
        memset(&self.acct, 0, sizeof(loop_acct))
        self.sources = {}
        self.epfd = -1

    def __dealloc__(self):
        free(self.acct.ctr)
        free(self.acct.touched)

    def configure(self, RxTable table, tables, int epfd, sources, Py_ssize_t nports,
                  Py_ssize_t nentries) -> None:
        """Run `sources` {fd: (LOOP_RING, in port index, in bridge index, device, ring,
        slot size, slot count) or (LOOP_TAP, in port index, in bridge index, device,
        read size, vnet)} with `table`, of `nports` ports and `nentries` MAC entries;
        `tables.current()` says whether `table` is still what the slow path wants. A
        ring source's device keeps the next slot in `ring_head`. Counts not folded yet
        are lost."""
        cdef uint64_t *ctr = <uint64_t *>calloc(nports * NCTR if nports > 0 else 1,
                                                sizeof(uint64_t))
        cdef uint8_t *touched = <uint8_t *>calloc(nentries if nentries > 0 else 1, 1)
        cdef dict srcs = {}
        cdef _Source s
        if ctr == NULL or touched == NULL:
            free(ctr)
            free(touched)
            raise MemoryError()
        try:
            for fd, spec in sources.items():
                s = _Source()
                s.kind, s.in_port, s.in_bridge, s.dev = spec[0], spec[1], spec[2], spec[3]
                if not (0 <= s.in_port < nports):
                    raise ValueError("a source's port index is outside the tables")
                if s.kind == SOURCE_RING:
                    s.ring, s.frame_size, s.frame_nr = spec[4], spec[5], spec[6]
                elif s.kind == SOURCE_TAP:
                    s.size, s.vnet = spec[4], spec[5]
                    if s.size <= 0:
                        raise ValueError("read size must be positive")
                else:
                    raise ValueError("unknown source kind")
                srcs[int(fd)] = s
        except BaseException:
            free(ctr)
            free(touched)
            raise
        free(self.acct.ctr)
        free(self.acct.touched)
        memset(&self.acct, 0, sizeof(loop_acct))
        self.acct.ctr, self.acct.touched = ctr, touched
        self.acct.nports, self.acct.nentries = nports, nentries
        self.table, self.tables, self.epfd, self.sources = table, tables, epfd, srcs

    def fold(self) -> tuple:
        """What the finished batches counted since the last fold, reset: (hits, tx hits,
        batches, [(port index, rx packets, rx bytes, tx packets, tx bytes), ...],
        [MAC entry index whose age to refresh, ...])."""
        cdef Py_ssize_t i
        cdef uint64_t *c
        cdef loop_acct *a = &self.acct
        ports = []
        entries = []
        if not a.batches:
            return (0, 0, 0, ports, entries)
        for i in range(a.nports):
            c = a.ctr + i * NCTR
            if c[0] or c[1] or c[2] or c[3]:
                ports.append((i, c[0], c[1], c[2], c[3]))
                memset(c, 0, NCTR * sizeof(uint64_t))
        for i in range(a.nentries):
            if a.touched[i]:
                entries.append(i)
                a.touched[i] = 0
        out = (a.hits, a.tx_hits, a.batches, ports, entries)
        a.hits = a.tx_hits = a.batches = 0
        return out

    def poll(self, double deadline, Py_ssize_t limit, errfds) -> list:
        """Wait (the GIL released) and run ready batches until `deadline` (time.monotonic)
        or until Python has work; returns that work, in order, as (fd, events, frames,
        result): an event the loop did not take (frames None, events set); a source in
        `errfds` that read frames again (frames None, events 0: its error count ends);
        a batch its burst did not finish (frames: the RingBatch, still to release, or the
        reads; result: rx_burst's or tx_burst's). An empty list: the deadline passed, a
        signal interrupted the wait, or the tables went out of date."""
        cdef int fds[64]
        cdef uint32_t evs[64]
        cdef int n, i, timeout
        cdef double now
        cdef list work = []
        cdef _Source s
        if self.epfd < 0:
            raise ValueError("configure the loop first")
        if ESP_LOOP_EVENTS > 64:
            raise SystemError("event array too small")
        while True:
            now = esp_monotonic()
            # (At most a minute per wait: an int of milliseconds, and a far deadline.)
            timeout = 0 if now >= deadline else <int>(min(deadline - now, 60.0) * 1000.0
                                                     + 0.999)
            with nogil:
                n = esp_epoll_wait(self.epfd, fds, evs, timeout)
            if n == -EINTR:
                return work
            if n < 0:
                raise OSError(-n, "epoll_wait")
            for i in range(n):
                s = self.sources.get(fds[i])
                if s is None:
                    work.append((fds[i], evs[i], None, None))
                    continue
                if s.kind == SOURCE_RING:
                    self._ring(s, fds[i], evs[i], limit, errfds, work)
                else:
                    self._tap(s, fds[i], evs[i], limit, errfds, work)
                # A burst may have run the SAs' lifetime accounting, which may change what
                # the slow path wants installed: no further burst on these tables. (The
                # descriptors not looked at yet stay ready: epoll reports them again.)
                if not self.tables.current():
                    return work
            if work or esp_monotonic() >= deadline:
                return work

    cdef _ring(self, _Source s, int fd, uint32_t ev, Py_ssize_t limit, errfds, list work):
        cdef RingBatch b = ring_take(s.ring, s.dev.ring_head, s.frame_size, s.frame_nr,
                                     limit)
        s.dev.ring_head = b.head
        if not b.n:
            b.release()
            if ev & (EPOLLERR_ | EPOLLHUP_):
                work.append((fd, ev, None, None))   # the port's own receive consumes it
            return
        if fd in errfds:
            work.append((fd, 0, None, None))
        result = _rx_burst(self.table, b, s.in_port, s.in_bridge, &self.acct)
        if result is None:            # counted here
            b.release()
        else:
            work.append((fd, 0, b, result))

    cdef _tap(self, _Source s, int fd, uint32_t ev, Py_ssize_t limit, errfds, list work):
        cdef list frames = tap_read(fd, limit, s.size)
        if not frames:
            if ev & (EPOLLERR_ | EPOLLHUP_):
                work.append((fd, ev, None, None))
            return
        if fd in errfds:
            work.append((fd, 0, None, None))
        result = _tx_burst(self.table, frames, s.in_port, s.in_bridge, s.vnet, &self.acct)
        if result is not None:
            work.append((fd, 0, frames, result))
