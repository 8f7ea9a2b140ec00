//! keybound: an encrypted virtual disk that is open only while its owner's
//! hardware key is plugged in.
//!
//! Layers (see docs/design.md): `secrets` (self-wiping, locked key material),
//! `token` (PIV over PC/SC), `softcard` (a software PIV card for tests and demos).
//! Nothing in the library prints or reads a terminal; that is the CLI's job.

pub mod audit;
pub mod container;
pub mod crypto;
pub mod fs;
pub mod fuse;
pub mod secrets;
pub mod session;
pub mod softcard;
pub mod token;
