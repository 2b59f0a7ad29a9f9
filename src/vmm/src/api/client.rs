//! A minimal client of the control API: one HTTP/1.1 request per connection over the
//! Unix socket, the JSON reply parsed. `faultvisor inject`/`stats` and the campaign
//! runner use it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A request that got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached, written or read.
    #[error("cannot reach the VMM at {path}: {source}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The answer was not an HTTP response.
    #[error("the VMM sent a malformed {0}")]
    Malformed(&'static str),
}

/// Replies read at most (the API's are far smaller).
const MAX_REPLY: u64 = 64 << 20;

/// Sends one request; returns (status, parsed JSON body, Null when it is not JSON).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    let unreachable = |source| ClientError::Unreachable {
        path: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    s.write_all(req.as_bytes()).map_err(unreachable)?;
    let mut resp = Vec::new();
    s.take(MAX_REPLY)
        .read_to_end(&mut resp)
        .map_err(unreachable)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or(ClientError::Malformed("response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ClientError::Malformed("status line"))?;
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}
