//! `picie healthcheck`: the container's probe of its own server, with no curl in the image.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::Result;

/// GET /health/ready on loopback at `port` with a plain HTTP/1.0 request; Ok when it answers 200.
pub fn ready(port: u16) -> Result<()> {
    let timeout = Duration::from_secs(3);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    anyhow::ensure!(&head[9..12] == b"200", "not ready: {}", String::from_utf8_lossy(&head));
    Ok(())
}
