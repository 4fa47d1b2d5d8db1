"""The INFORMATIONAL exchange (RFC 7296 §1.4, §2.4): deletes and liveness checks.

Ours: deleting a CHILD_SA or an IKE SA, and the empty request of a liveness check (DPD,
queued by `IkeCore.on_timer` when the peer has been silent for `dpd_delay`). The peer's:
Delete payloads for CHILD_SAs (answered with ours) and for the IKE SA (closed once the
response is out), including the delete that settles a crossing IKE SA rekey (§2.8.2).
Protocol extensions carried in INFORMATIONAL (MOBIKE's UPDATE_SA_ADDRESSES, say) go here.
"""

from __future__ import annotations

import struct
from typing import Any

from espswitch.ike.consts import Exchange, Protocol
from espswitch.ike.context import CoreContext
from espswitch.ike.create_child import IkeRekey
from espswitch.ike.errors import ProtocolError
from espswitch.ike.message import DeletePayload, Message, Payload
from espswitch.ike.sas import ChildSa, IkeSa, Request
from espswitch.ike.state import ChildState, ChildTrigger, IkeState, Trigger, transition
from espswitch.ike.window import Window

__all__ = ["Informational"]


class Informational:
    """INFORMATIONAL for one core; `ike_rekey` takes back CHILD_SAs after a rekey collision
    the peer settled first."""

    def __init__(self, ctx: CoreContext, window: Window, ike_rekey: IkeRekey) -> None:
        self.ctx, self.window, self.ike_rekey = ctx, window, ike_rekey
        window.register("delete_child", self._start_delete_child)
        window.register("delete_ike", self._start_delete_ike)
        window.register("dpd", self._start_dpd)

    # -- ours ------------------------------------------------------------------------------

    def _start_delete_child(self, sa: IkeSa, child: ChildSa, now: float) -> None:
        if child in sa.children or child.state in (ChildState.EXPIRED, ChildState.FAILED):
            child.fire(ChildTrigger.DELETE)
            self.window.request(sa, "delete_child", Exchange.INFORMATIONAL,
                                [DeletePayload(protocol=Protocol.ESP,
                                               spis=(struct.pack("!I", child.spi_in),))],
                                self._on_delete_child_response, child, now)

    def _start_delete_ike(self, sa: IkeSa, _ctx: Any, now: float) -> None:
        if sa.state is not IkeState.DELETING:
            sa.state = transition(sa.state, Trigger.DELETE)
        self.window.request(sa, "delete_ike", Exchange.INFORMATIONAL,
                            [DeletePayload(protocol=Protocol.IKE)],
                            self._on_delete_ike_response, None, now, self._on_delete_ike_error)

    def _start_dpd(self, sa: IkeSa, _ctx: Any, now: float) -> None:
        self.window.request(sa, "dpd", Exchange.INFORMATIONAL, [], self._on_dpd_response,
                            None, now)

    def _on_delete_child_response(self, sa: IkeSa, msg: Message, child: ChildSa,
                                  now: float) -> None:
        rekeyed = child.our_rekey is not None or child.peer_rekey is not None
        self.ctx.remove_child(sa, child, "rekeyed" if rekeyed else "deleted")

    def _on_delete_ike_response(self, sa: IkeSa, msg: Message, ctx: Any, now: float) -> None:
        self.ctx.close(sa, "rekeyed" if not sa.children else "deleted", now)

    def _on_delete_ike_error(self, sa: IkeSa, req: Request, e: ProtocolError,
                             now: float) -> None:
        self.ctx.close(sa, "deleted", now)

    def _on_dpd_response(self, sa: IkeSa, msg: Message, ctx: Any, now: float) -> None:
        return

    # -- the peer's ------------------------------------------------------------------------

    def on_request(self, sa: IkeSa, msg: Message, now: float) -> list[Payload]:
        """The peer's INFORMATIONAL request: the payloads of our response."""
        ours: list[bytes] = []
        for d in msg.all(DeletePayload):
            if d.protocol == Protocol.IKE:
                old = sa.born_of
                if old is not None and old.crossing is sa and old.outstanding is not None \
                        and old.outstanding.kind == "rekey_ike":
                    # The peer settled a rekey collision (§2.8.2) before our rekey's
                    # response reached us: this new SA lost, ours will win. Its CHILD_SAs
                    # go back to the old SA, which hands them to ours when it completes.
                    self.ike_rekey.adopt(old, sa)
                    sa.close_after_response = "rekeyed"
                    return []
                sa.close_after_response = "deleted by peer" if sa.state is not \
                    IkeState.REKEYED else "rekeyed"
                return []
            if d.protocol != Protocol.ESP:
                continue
            for raw in d.spis:
                if len(raw) != 4:
                    continue
                spi = struct.unpack("!I", raw)[0]
                child = next((c for c in sa.children if c.spi_out == spi), None)
                if child is None:
                    continue
                if child.state is not ChildState.DELETING:
                    ours.append(struct.pack("!I", child.spi_in))
                self.ctx.remove_child(sa, child, "deleted by peer")
        if ours:
            return [DeletePayload(protocol=Protocol.ESP, spis=tuple(ours))]
        return []
