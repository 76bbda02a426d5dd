"""pynetdicom's own ceiling: the same listener set-up as machaon (streamed
datasets, same PDU size, same contexts) with a C-STORE handler that keeps
nothing. What machaon cannot beat while it runs on pynetdicom."""

import sys

from machaon.config import DicomSettings
from machaon.scp import TRANSFER_SYNTAXES
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

_config.STORE_RECV_CHUNKED_DATASET = True
ae = AE("NOOP")
ae.maximum_pdu_size = DicomSettings().max_pdu_size
for context in AllStoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
