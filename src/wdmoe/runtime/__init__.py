"""The distributed runtime: a BS and device workers over gRPC (the testbed face of wdmoe).

wire       versioned binary frames for hidden states (dtype + shape + raw bytes; pure)
api        versioned JSON control messages: Register, Generate (streaming), Stats (pure)
device     a worker that loads only its expert shards, runs them, registers and heartbeats
placement  the registry of devices and the replica choice
bs         the BS: BS part of the model, deadlines, drop/wait/fallback, emulated links, service
client     the user's side: generate (streamed), stats, wait until ready
cluster    a BS and N device processes on this machine, always torn down
security   shared-token auth, (mutual) TLS, throwaway certificates
netns      network namespaces + veth + tc tbf for multi-host runs on one machine
remote     a bare dispatcher without a cell (placement → devices), for tests and tools
"""
