//! PIV tokens over PC/SC.
