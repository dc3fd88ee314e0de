//! HTTP on loopback, as little of it as the daemon's API and the monitoring stack need:
//! a GET with `Connection: close`, read to the end.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    try_free_port().expect("a free loopback port")
}

pub fn try_free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET `path` on loopback `port`: (status, body). HTTP/1.1 with `Connection: close`; a
/// chunked body (Go's servers send one when they please) is decoded. An error when nothing
/// or no complete head comes back within 30 s.
pub fn try_http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("GET {path}: sending"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("GET {path}: reading the answer"))?;
    parse(&raw).with_context(|| {
        format!(
            "GET {path}: no status line and end of headers in {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// GET `path` on loopback `port`: (status, JSON body, or the text if not JSON);
/// (0, null) when nothing answered, for those polling a server that is not up yet.
pub fn http_get(port: u16, path: &str) -> (u16, Value) {
    match try_http_get(port, path) {
        Ok((status, body)) => (status, json_or_text(body)),
        Err(_) => (0, Value::Null),
    }
}

/// An HTTP/1.x response read to its end: (status, JSON body, or the text if not JSON);
/// status 0 when there is none.
pub fn http_response(raw: &[u8]) -> (u16, Value) {
    match parse(raw) {
        Some((status, body)) => (status, json_or_text(body)),
        None => (0, Value::String(String::new())),
    }
}

fn json_or_text(body: String) -> Value {
    serde_json::from_str(&body).unwrap_or(Value::String(body))
}

/// (status, body) of a whole response; `None` without a status line and an end of
/// headers.
fn parse(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((status, body))
}

/// A chunked body decoded: `size-in-hex[;ext]\r\n data\r\n`, until a chunk of size 0.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (line, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_json_and_text_bodies() {
        let (status, body) =
            http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": true}");
        assert_eq!(status, 200);
        assert_eq!(body["a"], true);
        let (status, body) = http_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope");
        assert_eq!(status, 404);
        assert_eq!(body, "nope");
        assert_eq!(http_response(b"").0, 0);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let (status, body) = http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\n{\"a\"\r\nA;ext=1\r\n: [1, 2]}\n\r\n0\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert_eq!(body["a"], serde_json::json!([1, 2]));
    }
}
