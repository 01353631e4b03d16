"""The distributed runtime: a BS and device workers (the testbed face of wdmoe). Control (register,
heartbeat, health, Generate, Stats) travels over gRPC, expert calls over the stream data plane.

wire       versioned binary frames for hidden states (dtype + shape + raw bytes; pure)
api        versioned JSON control messages: Register, Generate (streaming), Stats (pure)
dataplane  expert calls on one authenticated (optionally mutual-TLS) stream per device
device     a worker that loads only its expert shards, runs them, registers and heartbeats
placement  the registry of devices and the replica choice
settings   how the BS treats devices, links and users (the deadline rule is the core's)
bs         the BS: BS part of the model, the cell, the devices; dispatch (replicas, deadlines,
           fail-over, benching), links (calls over either plane, emulated links), books
           (statistics, metrics log), service / server (the gRPC face: admission, streaming)
client     the user's side: generate (streamed), stats, wait until ready
cluster    a BS and N device processes on this machine, always torn down
security   shared-token auth, (mutual) TLS, throwaway certificates
netns      network namespaces + veth + tc tbf for multi-host runs on one machine
"""
