//! Free loopback ports for processes that must be told their port up front.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// A port that was free a moment ago. Another process may still take it before ours binds;
/// launchers retry with a new port when that happens.
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
