//! Who may drive the admin endpoint: the token, and the `Host`/`Origin` rules.
//!
//! The admin endpoint must answer the host's operator (the command line, `curl`, Kubernetes
//! probes, Prometheus) and nobody else, in particular not a web page open in a browser on the
//! same host, which can send requests to `127.0.0.1` (HTML form posts, `no-cors` fetches) and,
//! through DNS rebinding, even read the answers. Three rules, checked before any handler work:
//!
//! 1. **Token.** State-changing calls (`POST /consumers/{name}/enable|disable`) and the tap
//!    (`GET /tap`, which streams row data) need `Authorization: Bearer TOKEN`. The token is 32
//!    random bytes (64 hex digits) that the service writes at first start into a file only its
//!    user can read (mode 0600): `admin.token_file`, by default `admin.token` beside
//!    `consumers.state_file`. The command line reads the same file. A web page cannot read it and
//!    cannot set an `Authorization` header cross-origin without a CORS preflight, which this
//!    server never grants. Compared in constant time. Missing or wrong: 401.
//! 2. **Host.** Every route except the probes needs a `Host` header that names this service:
//!    `localhost`, a loopback IP (`127.0.0.1`, `[::1]`, ...), or the bound IP (any IP literal when
//!    bound to a wildcard such as `0.0.0.0`), with the bound port (no port only when bound to
//!    80). A DNS-rebinding page sends its own domain name: 421.
//! 3. **Origin.** A request that carries an `Origin` header is refused (403) unless that origin
//!    is `http://` + a host allowed by rule 2. This covers every route, probes included, and
//!    `Origin: null` (sandboxed frames, `file:` pages) is refused too. The command line, `curl`,
//!    kubelet and Prometheus send no `Origin`.
//!
//! The probes `/health`, `/ready` and `/metrics` skip rule 2 (kubelet and Prometheus address
//! the pod by IP or by a Service name) and need no token; they carry no row data and change
//! nothing.
//!
//! Binding: a loopback `admin.bind` is always allowed. Any other address (including `0.0.0.0`)
//! needs `admin.allow_remote = true`; [`check_bind`] refuses it otherwise, naming `admin.bind`.
//! The token rule holds either way.

use crate::config::Config;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// The file name of the token when `admin.token_file` is not set.
pub const DEFAULT_TOKEN_FILE_NAME: &str = "admin.token";

/// Errors about the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {}: {source} (key admin.token_file)", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "admin token file {}: holds no usable token (expected at least 32 printable characters \
         on one line; delete the file and restart the service to generate a new one)",
        path.display()
    )]
    Malformed { path: PathBuf },
}

/// The admin credential. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Token {
    /// A token of this text (tests, or a token taken from elsewhere).
    pub fn new(text: impl Into<String>) -> Self {
        Token(text.into())
    }

    /// A new random token: 32 bytes from the operating system, as 64 hex digits.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's random source");
        Token(hex::encode(bytes))
    }

    /// The value, for an `Authorization: Bearer` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Read the token file; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<Token>, TokenError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let token = text.trim();
        if token.len() < 32 || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(TokenError::Malformed {
                path: path.to_path_buf(),
            });
        }
        Ok(Some(Token(token.to_string())))
    }

    /// The token in `path`, generated and written first (mode 0600, parent directories created)
    /// when the file does not exist. The file is created exclusively, complete or not at all.
    pub fn load_or_create(path: &Path) -> Result<Token, TokenError> {
        if let Some(t) = Token::read(path)? {
            warn_if_shared(path);
            return Ok(t);
        }
        let ioerr = |source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(ioerr)?;
        let token = Token::generate();
        // tempfile creates the file with mode 0600 on Unix.
        let mut tmp = tempfile::Builder::new()
            .prefix(".admin-token.")
            .tempfile_in(&dir)
            .map_err(ioerr)?;
        writeln!(tmp, "{}", token.0).map_err(ioerr)?;
        tmp.as_file().sync_all().map_err(ioerr)?;
        match tmp.persist_noclobber(path) {
            Ok(_) => {
                tracing::info!(file = %path.display(), "admin token generated");
                Ok(token)
            }
            // Another process created it first: use theirs.
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Token::read(path)?
                .ok_or_else(|| TokenError::Malformed {
                    path: path.to_path_buf(),
                }),
            Err(e) => Err(ioerr(e.error)),
        }
    }
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "admin token file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_: &Path) {}

/// Where the token lives for this configuration: `admin.token_file`, else `admin.token` in
/// the directory of `consumers.state_file`.
pub fn token_path(cfg: &Config) -> PathBuf {
    if let Some(p) = &cfg.admin.token_file {
        return p.clone();
    }
    match cfg.consumers.state_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(DEFAULT_TOKEN_FILE_NAME),
        _ => PathBuf::from(DEFAULT_TOKEN_FILE_NAME),
    }
}

/// Refuse a non-loopback `admin.bind` unless `admin.allow_remote` is set. The error is the
/// message to print; it names the keys.
pub fn check_bind(cfg: &Config) -> Result<(), String> {
    if !cfg.admin.enabled || cfg.admin.allow_remote {
        return Ok(());
    }
    let addr: SocketAddr = match cfg.admin.bind.parse() {
        Ok(a) => a,
        Err(_) => return Ok(()), // config validation reports the malformed address
    };
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "admin.bind = `{}` is not a loopback address: the admin endpoint would be reachable from \
         other hosts. Set admin.allow_remote = true to accept that (state-changing calls and the \
         tap still need the token from {}), or bind 127.0.0.1",
        cfg.admin.bind,
        token_path(cfg).display()
    ))
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `/health`, `/ready`, `/metrics`: only the `Origin` rule.
    Probe,
    /// Read-only routes: `Host` and `Origin` rules.
    Read,
    /// State-changing routes and the tap: `Host`, `Origin` and the token.
    Token,
}

/// Why a request was refused: the HTTP status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// The rules for one bound endpoint.
#[derive(Debug, Clone)]
pub struct Access {
    token: Token,
    bound: SocketAddr,
}

impl Access {
    pub fn new(token: Token, bound: SocketAddr) -> Self {
        Access { token, bound }
    }

    /// The address the rules are checked against (the one actually bound).
    pub fn bound(&self) -> SocketAddr {
        self.bound
    }

    /// Set the bound address once known (after binding port 0).
    pub fn set_bound(&mut self, bound: SocketAddr) {
        self.bound = bound;
    }

    /// Whether `host` (a `Host` header value, or an origin's `host[:port]`) names this service.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        let port_ok = match port {
            Some(p) => p == self.bound.port(),
            None => self.bound.port() == 80,
        };
        if !port_ok {
            return false;
        }
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let Ok(ip) = name.parse::<IpAddr>() else {
            return false;
        };
        ip.is_loopback() || ip == self.bound.ip() || self.bound.ip().is_unspecified()
    }

    /// Whether an `Origin` header value is this service itself.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        match origin.strip_prefix("http://") {
            Some(rest) if !rest.contains('/') => self.host_allowed(rest),
            _ => false,
        }
    }

    /// Check one request's headers. `host` and `origin` are the raw header values (`None` when
    /// absent; a value that is not visible ASCII counts as foreign); `authorization` likewise.
    pub fn check(
        &self,
        need: Need,
        host: Option<&[u8]>,
        origin: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_string);
        if let Some(o) = origin {
            let ok = text(o).is_some_and(|o| self.origin_allowed(o.trim()));
            if !ok {
                return Err(Refusal {
                    status: 403,
                    message: "cross-origin request refused: the admin endpoint only answers \
                              requests without an Origin header or from its own origin"
                        .into(),
                });
            }
        }
        if need == Need::Probe {
            return Ok(());
        }
        let host_ok = host
            .and_then(text)
            .is_some_and(|h| self.host_allowed(h.trim()));
        if !host_ok {
            return Err(Refusal {
                status: 421,
                message: format!(
                    "Host header refused: the admin endpoint answers only to localhost, a \
                     loopback address or its bound address, port {}",
                    self.bound.port()
                ),
            });
        }
        if need == Need::Token {
            let presented = authorization
                .and_then(text)
                .and_then(|a| bearer(&a).map(str::to_string));
            match presented {
                None => {
                    return Err(Refusal {
                        status: 401,
                        message: "this call needs the admin token: send `Authorization: Bearer \
                                  TOKEN` with the token from the service's admin token file"
                            .into(),
                    });
                }
                Some(t) if !self.token.matches(&t) => {
                    return Err(Refusal {
                        status: 401,
                        message: "wrong admin token".into(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer TOKEN` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// `name[:port]` or `[v6][:port]` → (name without brackets, port).
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    if host.is_empty() {
        return None;
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        return match after {
            "" => Some((ip, None)),
            p => Some((ip, Some(p.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match host.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => Some((name, Some(p.parse().ok()?))),
        Some(_) => None, // a bare IPv6 address must be bracketed
        None => Some((host, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(bound: &str) -> Access {
        Access::new(Token::new("t".repeat(64)), bound.parse().unwrap())
    }

    #[test]
    fn hosts_that_name_the_service() {
        let a = access("127.0.0.1:9090");
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST:9090",
            "[::1]:9090",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "127.0.0.1:9091",
            "127.0.0.1",
            "10.0.0.5:9090",
            "localhost.evil.example:9090",
            "",
            "::1:9090",
            "[::1]x",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
        let wild = access("0.0.0.0:9090");
        assert!(wild.host_allowed("10.1.2.3:9090"));
        assert!(!wild.host_allowed("svc.cluster.local:9090"));
        let bound = access("10.0.0.5:9090");
        assert!(bound.host_allowed("10.0.0.5:9090"));
        assert!(!bound.host_allowed("10.0.0.6:9090"));
    }

    #[test]
    fn origins_headers_and_tokens() {
        let a = access("127.0.0.1:9090");
        let token = format!("Bearer {}", "t".repeat(64));
        let host = Some(&b"127.0.0.1:9090"[..]);
        assert_eq!(
            a.check(Need::Token, host, None, Some(token.as_bytes())),
            Ok(())
        );
        // own origin is fine
        assert!(
            a.check(
                Need::Token,
                host,
                Some(b"http://localhost:9090"),
                Some(token.as_bytes())
            )
            .is_ok()
        );
        for origin in [
            &b"null"[..],
            b"http://evil.example",
            b"https://127.0.0.1:9090",
            b"http://127.0.0.1:9091",
        ] {
            let r = a.check(Need::Probe, None, Some(origin), None).unwrap_err();
            assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(origin));
        }
        assert_eq!(
            a.check(Need::Read, Some(b"evil.example:9090"), None, None)
                .unwrap_err()
                .status,
            421
        );
        assert_eq!(
            a.check(Need::Read, None, None, None).unwrap_err().status,
            421
        );
        assert_eq!(
            a.check(Need::Probe, Some(b"10.9.9.9:80"), None, None),
            Ok(())
        );
        assert_eq!(
            a.check(Need::Token, host, None, None).unwrap_err().status,
            401
        );
        let wrong = format!("Bearer {}", "u".repeat(64));
        let r = a
            .check(Need::Token, host, None, Some(wrong.as_bytes()))
            .unwrap_err();
        assert_eq!((r.status, r.message.as_str()), (401, "wrong admin token"));
        assert_eq!(
            a.check(Need::Token, host, None, Some(b"Basic dTpw"))
                .unwrap_err()
                .status,
            401
        );
    }

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/admin.token");
        assert!(Token::read(&path).unwrap().is_none());
        let t = Token::load_or_create(&path).unwrap();
        assert_eq!(t.expose().len(), 64);
        assert!(t.expose().chars().all(|c| c.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(Token::load_or_create(&path).unwrap(), t);
        assert_ne!(Token::generate(), t);
        assert_eq!(format!("{t:?}"), "Token(***)");
        std::fs::write(&path, "short\n").unwrap();
        let err = Token::read(&path).unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
    }

    #[test]
    fn non_loopback_bind_needs_the_opt_in() {
        let mut cfg = Config::default();
        assert!(check_bind(&cfg).is_ok());
        cfg.admin.bind = "0.0.0.0:9090".into();
        let err = check_bind(&cfg).unwrap_err();
        assert!(err.starts_with("admin.bind = `0.0.0.0:9090`"), "{err}");
        assert!(err.contains("admin.allow_remote"), "{err}");
        cfg.admin.allow_remote = true;
        assert!(check_bind(&cfg).is_ok());
        cfg.admin.allow_remote = false;
        cfg.admin.bind = "[::1]:9090".into();
        assert!(check_bind(&cfg).is_ok());
        assert_eq!(
            token_path(&cfg),
            PathBuf::from("state").join(DEFAULT_TOKEN_FILE_NAME)
        );
    }
}
