//! A software PIV card for tests and demos (see keybound-softcard).
