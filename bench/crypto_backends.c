/* AES-128-GCM per ESP packet: OpenSSL's EVP interface (as the compiled fast path calls it)
 * against Intel's Multi-Buffer Crypto for IPsec (libipsec-mb, as DPDK and VPP use it),
 * run by bench/crypto_backends.py, which builds this file and prints the ratios.
 *
 *   crypto_backends SIZE ROUNDS BURST
 *
 * Each round seals then opens BURST packets of SIZE bytes with ESP's 12-byte nonce (salt +
 * 8-byte IV) and 8-byte AAD (SPI, sequence number), 16-byte tag, in four ways: EVP one call
 * sequence per packet; libipsec-mb's direct GCM functions one call per packet; libipsec-mb's
 * job API, BURST jobs submitted then completed. Every backend's ciphertext and tag are
 * checked against EVP's first, so the figures are for the same work. Prints one JSON line.
 */
#include <intel-ipsec-mb.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAXB 256
#define MAXS 9000

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static unsigned char key[16], salt[4];
static unsigned char pt[MAXB][MAXS], ct[MAXB][MAXS], back[MAXB][MAXS];
static unsigned char aad[MAXB][8], nonce[MAXB][12], tag[MAXB][16];
static unsigned char ref_ct[MAXB][MAXS], ref_tag[MAXB][16], open_tag[MAXB][16];

static void die(const char *what)
{
    fprintf(stderr, "crypto_backends: %s\n", what);
    exit(1);
}

static void packet_params(int n, uint64_t seq)
{
    for (int i = 0; i < n; i++) {
        uint64_t s = seq + i;
        memcpy(aad[i], "\x00\x00\x10\x01", 4);          /* SPI */
        for (int b = 0; b < 4; b++)
            aad[i][4 + b] = (unsigned char)(s >> (24 - 8 * b)); /* sequence number */
        memcpy(nonce[i], salt, 4);
        for (int b = 0; b < 8; b++)
            nonce[i][4 + b] = (unsigned char)(s >> (56 - 8 * b)); /* IV = sequence number */
    }
}

static void evp_seal(EVP_CIPHER_CTX *c, int i, int size)
{
    int l;
    if (!EVP_CipherInit_ex(c, NULL, NULL, NULL, nonce[i], 1) ||
        !EVP_CipherUpdate(c, NULL, &l, aad[i], 8) ||
        !EVP_CipherUpdate(c, ct[i], &l, pt[i], size) ||
        !EVP_CipherFinal_ex(c, ct[i] + l, &l) ||
        !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag[i]))
        die("EVP seal failed");
}

static void evp_open(EVP_CIPHER_CTX *c, int i, int size)
{
    int l;
    if (!EVP_CipherInit_ex(c, NULL, NULL, NULL, nonce[i], 0) ||
        !EVP_CipherUpdate(c, NULL, &l, aad[i], 8) ||
        !EVP_CipherUpdate(c, back[i], &l, ct[i], size) ||
        !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, tag[i]) ||
        EVP_CipherFinal_ex(c, back[i] + l, &l) <= 0)
        die("EVP open failed");
}

static void check(int n, int size, const char *who)
{
    for (int i = 0; i < n; i++) {
        if (memcmp(ct[i], ref_ct[i], size) || memcmp(tag[i], ref_tag[i], 16)) {
            fprintf(stderr, "crypto_backends: %s differs from EVP at packet %d\n", who, i);
            exit(1);
        }
        if (memcmp(back[i], pt[i], size)) {
            fprintf(stderr, "crypto_backends: %s did not open packet %d\n", who, i);
            exit(1);
        }
    }
}

static void imb_job(IMB_MGR *m, const struct gcm_key_data *k, struct gcm_context_data *ctxs,
                    int i, int size, int enc)
{
    IMB_JOB *job = IMB_GET_NEXT_JOB(m);
    job->cipher_direction = enc ? IMB_DIR_ENCRYPT : IMB_DIR_DECRYPT;
    job->chain_order = enc ? IMB_ORDER_CIPHER_HASH : IMB_ORDER_HASH_CIPHER;
    job->cipher_mode = IMB_CIPHER_GCM;
    job->hash_alg = IMB_AUTH_AES_GMAC;
    job->enc_keys = k;
    job->dec_keys = k;
    job->key_len_in_bytes = 16;
    job->src = enc ? pt[i] : ct[i];
    job->dst = enc ? ct[i] : back[i];
    job->cipher_start_src_offset_in_bytes = 0;
    job->msg_len_to_cipher_in_bytes = size;
    job->hash_start_src_offset_in_bytes = 0;
    job->msg_len_to_hash_in_bytes = size;
    job->iv = nonce[i];
    job->iv_len_in_bytes = 12;
    job->u.GCM.aad = aad[i];
    job->u.GCM.aad_len_in_bytes = 8;
    job->u.GCM.ctx = &ctxs[i];
    /* On open the computed tag goes aside, to be compared, as a caller must. */
    job->auth_tag_output = enc ? tag[i] : open_tag[i];
    job->auth_tag_output_len_in_bytes = 16;
    job->user_data = (void *)(intptr_t)i;
    IMB_JOB *done = IMB_SUBMIT_JOB(m);
    while (done) {
        if (done->status != IMB_STATUS_COMPLETED)
            die("libipsec-mb job failed");
        done = IMB_GET_COMPLETED_JOB(m);
    }
}

static void imb_drain(IMB_MGR *m)
{
    IMB_JOB *done;
    while ((done = IMB_FLUSH_JOB(m)) != NULL)
        if (done->status != IMB_STATUS_COMPLETED)
            die("libipsec-mb job failed");
}

int main(int argc, char **argv)
{
    if (argc != 4)
        die("usage: crypto_backends SIZE ROUNDS BURST");
    int size = atoi(argv[1]), rounds = atoi(argv[2]), burst = atoi(argv[3]);
    if (size < 1 || size > MAXS || rounds < 1 || burst < 1 || burst > MAXB - 8)
        die("SIZE 1..9000, ROUNDS >= 1, BURST 1..248");
    for (int i = 0; i < 16; i++)
        key[i] = (unsigned char)(i * 7 + 1);
    memcpy(salt, "\x5a\x17\x0c\x3e", 4);
    for (int i = 0; i < burst; i++)
        for (int b = 0; b < size; b++)
            pt[i][b] = (unsigned char)(b * 31 + i);

    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    EVP_CIPHER_CTX *e = EVP_CIPHER_CTX_new(), *d = EVP_CIPHER_CTX_new();
    if (!cipher || !e || !d || !EVP_CipherInit_ex(e, cipher, NULL, key, NULL, 1) ||
        !EVP_CipherInit_ex(d, cipher, NULL, key, NULL, 0))
        die("EVP setup failed");

    IMB_MGR *m = alloc_mb_mgr(0);
    if (!m)
        die("alloc_mb_mgr failed");
    IMB_ARCH arch;
    init_mb_mgr_auto(m, &arch);
    struct gcm_key_data kd __attribute__((aligned(64)));
    static struct gcm_context_data ctxs[MAXB] __attribute__((aligned(64)));
    IMB_AES128_GCM_PRE(m, key, &kd);

    /* The reference: EVP's output for packet parameters of sequence 1. */
    packet_params(burst, 1);
    for (int i = 0; i < burst; i++)
        evp_seal(e, i, size);
    memcpy(ref_ct, ct, sizeof ct);
    memcpy(ref_tag, tag, sizeof tag);

    double t_evp, t_direct, t_job;
    uint64_t seq;
    unsigned char chk[16];

    /* EVP, as the fast path: one seal and one open call sequence per packet. */
    memset(back, 0, sizeof back);
    seq = 1;
    double t0 = now();
    for (int r = 0; r < rounds; r++) { /* the same packets each round: outputs comparable */
        packet_params(burst, seq);
        for (int i = 0; i < burst; i++)
            evp_seal(e, i, size);
        for (int i = 0; i < burst; i++)
            evp_open(d, i, size);
    }
    t_evp = now() - t0;
    check(burst, size, "EVP");

    /* libipsec-mb's direct GCM functions, one call per packet each way. */
    memset(ct, 0, sizeof ct);
    memset(back, 0, sizeof back);
    t0 = now();
    for (int r = 0; r < rounds; r++) {
        packet_params(burst, seq);
        for (int i = 0; i < burst; i++)
            IMB_AES128_GCM_ENC(m, &kd, &ctxs[i], ct[i], pt[i], size, nonce[i], aad[i], 8,
                               tag[i], 16);
        for (int i = 0; i < burst; i++) {
            IMB_AES128_GCM_DEC(m, &kd, &ctxs[i], back[i], ct[i], size, nonce[i], aad[i], 8,
                               chk, 16);
            if (memcmp(chk, tag[i], 16))
                die("libipsec-mb direct: tag mismatch");
        }
    }
    t_direct = now() - t0;
    check(burst, size, "libipsec-mb direct");

    /* libipsec-mb's job API: a burst of jobs each way, then flushed. */
    memset(ct, 0, sizeof ct);
    memset(back, 0, sizeof back);
    t0 = now();
    for (int r = 0; r < rounds; r++) {
        packet_params(burst, seq);
        for (int i = 0; i < burst; i++)
            imb_job(m, &kd, ctxs, i, size, 1);
        imb_drain(m);
        for (int i = 0; i < burst; i++)
            imb_job(m, &kd, ctxs, i, size, 0);
        imb_drain(m);
        for (int i = 0; i < burst; i++)
            if (memcmp(open_tag[i], tag[i], 16))
                die("libipsec-mb jobs: tag mismatch");
    }
    t_job = now() - t0;
    check(burst, size, "libipsec-mb jobs");

    double n = (double)rounds * burst;
    printf("{\"size\": %d, \"packets\": %.0f, \"burst\": %d, \"imb_version\": \"%s\", "
           "\"imb_arch\": %d, \"evp_ns\": %.1f, \"imb_direct_ns\": %.1f, \"imb_job_ns\": %.1f}\n",
           size, n, burst, imb_get_version_str(), (int)arch,
           t_evp / n * 1e9, t_direct / n * 1e9, t_job / n * 1e9);
    free_mb_mgr(m);
    EVP_CIPHER_CTX_free(e);
    EVP_CIPHER_CTX_free(d);
    EVP_CIPHER_free(cipher);
    return 0;
}
