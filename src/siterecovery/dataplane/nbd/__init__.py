"""The mobility agent's NBD export: each protected disk served as an NBD server, every write captured.

Any NBD client (QEMU, `qemu-io`, `qemu-img`, `nbdcopy`, `fio --ioengine=nbd`) uses the export as the
machine's disk. The server speaks the fixed-newstyle handshake (LIST, INFO, GO, EXPORT_NAME, ABORT,
STRUCTURED_REPLY, LIST/SET_META_CONTEXT `base:allocation`) and the transmission commands READ, WRITE
(FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), BLOCK_STATUS and DISC. Every connection is an asyncio
`BufferedProtocol` that receives straight into one reusable buffer and applies requests in the
event-loop thread: writes of all connections to an export therefore reach the image and the
`CaptureSink` in one order without a lock, and a write's payload goes from the socket to `pwrite`
and the sink as a `memoryview` without a copy. Zero writes and trims punch holes so the image stays
sparse. A client's mistake (bad range, alignment, flag, command) is answered with an NBD error;
only a broken framing (bad magic) ends a connection, as the protocol requires.

The package: `wire` (the protocol's numbers and message layouts), `image` (an export and its open
image: positional I/O, hole punching, allocation extents), `negotiation` (the handshake's options),
`connection` (one client: framing, request parsing and replies) and `server` (`NbdServer`, and
`ServerThread` for synchronous callers). Callers import from the module that defines a name.
"""
