"""The distributed runtime: wire format, device worker and the remote dispatcher the BS uses.

wire    versioned messages; tensors as dtype + shape + raw bytes (pure, no I/O)
device  a gRPC worker that loads only its expert shards and runs them on request
remote  ``RemoteDispatcher``: fans a layer's experts out to the devices, drops the ones that fail
"""
