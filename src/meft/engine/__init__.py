"""The sparse engine: routing, exact kernels, the offloaded adapter, host stores (RAM, disk,
compact), the row-sparse optimizer and the distributed adapter. Imports no other layer but
errors and sysinfo."""
