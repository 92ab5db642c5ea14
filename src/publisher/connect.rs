//! Opening one AMQP connection to one of the configured brokers, with TLS when the URL is
//! `amqps://` (`[amqp.tls]`: the CA to trust, an optional client certificate).
//!
//! How it fails: an unreachable or refusing broker is [`PublishError::Unavailable`] (worth
//! retrying, on this or another node); a TLS handshake the broker's certificate fails (signed
//! by another CA, made for another host name, expired) or unreadable TLS files are
//! [`PublishError::Tls`], which retrying does not fix. Messages show URLs with the password
//! replaced by `***`; key files are never echoed.

use super::PublishError;
use crate::config::{AmqpConfig, Secret, TlsConfig, redact_url};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connect, Connection, ConnectionProperties};

/// The TLS settings for lapin from `[amqp.tls]` (files read now).
pub fn tls_config(tls: &TlsConfig) -> Result<OwnedTLSConfig, PublishError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            PublishError::Tls(format!("{key} = {} cannot be read: {e}", path.display()))
        })
    };
    let cert_chain = match &tls.ca_file {
        None => None,
        Some(p) => Some(
            String::from_utf8(read("amqp.tls.ca_file", p)?).map_err(|_| {
                PublishError::Tls(format!(
                    "amqp.tls.ca_file = {} is not a PEM file",
                    p.display()
                ))
            })?,
        ),
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls.cert_file", cert)?,
            key: read("amqp.tls.key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Connect to `url` (one of [`AmqpConfig::endpoints`]) with `[amqp.tls]` applied.
pub async fn connect(
    cfg: &AmqpConfig,
    url: &Secret,
    props: ConnectionProperties,
) -> Result<Connection, PublishError> {
    let raw = with_heartbeat(url.expose());
    let tls = tls_config(&cfg.tls)?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| {
        PublishError::Unavailable(format!("no async runtime for the AMQP client: {e}"))
    })?;
    raw.as_str()
        .connect_with_config(props, tls, runtime)
        .await
        .map_err(|e| {
            let text = e.to_string();
            match explain_tls_error(&text, url.expose(), &cfg.tls) {
                Some(why) => PublishError::Tls(why),
                None => PublishError::Unavailable(format!(
                    "cannot connect to {}: {text}",
                    redact_url(url.expose())
                )),
            }
        })
}

/// Connect to the first of [`AmqpConfig::endpoints`] that answers, in order; the error of the
/// last one when none does (a TLS error at once: the other nodes share the settings).
pub async fn connect_any(
    cfg: &AmqpConfig,
    props: ConnectionProperties,
) -> Result<Connection, PublishError> {
    let mut last = PublishError::Unavailable("no broker URL configured".into());
    for url in cfg.endpoints() {
        match connect(cfg, &url, props.clone()).await {
            Ok(conn) => return Ok(conn),
            Err(e @ PublishError::Tls(_)) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A TLS failure in a connection error's text, explained with the setting to fix; `None` when
/// the error is not about TLS.
pub fn explain_tls_error(text: &str, url: &str, tls: &TlsConfig) -> Option<String> {
    let shown = redact_url(url);
    let host = host_of(url);
    let ca = tls.ca_file.as_ref().map_or_else(
        || "the system's CA roots (amqp.tls.ca_file is unset)".to_string(),
        |p| format!("amqp.tls.ca_file = {}", p.display()),
    );
    let lower = text.to_ascii_lowercase();
    let why = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        format!(
            "the broker's certificate is not signed by a CA in {ca}; set amqp.tls.ca_file to \
             the CA that signed it"
        )
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        format!(
            "the broker's certificate is not valid for the host name '{host}' of the URL; \
             connect by a name the certificate lists (its subjectAltName)"
        )
    } else if lower.contains("expired") {
        "the broker's certificate has expired (or is not valid yet)".to_string()
    } else if lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("tls")
        || lower.contains("alert")
    {
        format!("TLS handshake failed (CA: {ca})")
    } else {
        return None;
    };
    Some(format!("TLS to {shown}: {why} (client said: {text})"))
}

/// The host of `url` as the client connects to it (`[::1]` for an IPv6 address); empty when
/// `url` is not a URL with a host.
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// The broker URL with a heartbeat, so a link that carries nothing is noticed: `heartbeat=10`
/// is added unless the URL's query sets `heartbeat` (lapin reads it from there). A URL that
/// does not parse is returned as it is, for lapin to refuse with its own reason.
pub(super) fn with_heartbeat(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    if u.query_pairs().any(|(key, _)| key == "heartbeat") {
        return raw.to_string();
    }
    u.query_pairs_mut()
        .append_pair("heartbeat", &DEFAULT_HEARTBEAT_SECS.to_string());
    u.into()
}

/// Seconds between AMQP heartbeats unless the URL says otherwise.
pub const DEFAULT_HEARTBEAT_SECS: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_name_the_cause_and_the_setting() {
        let tls = TlsConfig {
            ca_file: Some("/etc/ca.pem".into()),
            ..TlsConfig::default()
        };
        let url = "amqps://u:secret@broker.example:5671/%2f";
        let e = explain_tls_error(
            "IO error: invalid peer certificate: UnknownIssuer",
            url,
            &tls,
        )
        .expect("a TLS error");
        assert!(
            e.starts_with(
                "TLS to amqps://u:***@broker.example:5671/%2f: the broker's certificate is not \
                 signed by a CA in amqp.tls.ca_file = /etc/ca.pem"
            ),
            "{e}"
        );
        assert!(!e.contains("secret"));
        let e = explain_tls_error(
            "invalid peer certificate: NotValidForName",
            url,
            &TlsConfig::default(),
        )
        .expect("a TLS error");
        assert!(
            e.contains("not valid for the host name 'broker.example'"),
            "{e}"
        );
        assert_eq!(
            explain_tls_error("Connection refused (os error 111)", url, &tls),
            None
        );
    }

    #[test]
    fn the_host_of_a_url() {
        assert_eq!(host_of("amqps://u:p@h.example:5671/%2f"), "h.example");
        assert_eq!(host_of("amqp://127.0.0.1"), "127.0.0.1");
        assert_eq!(host_of("amqp://u@host/v?heartbeat=5"), "host");
        // what splitting at the last '@' and ':' got wrong
        assert_eq!(host_of("amqp://host/v?reply_to=a@b"), "host");
        assert_eq!(host_of("amqp://u:p%40ss@host:5671/v"), "host");
        assert_eq!(host_of("amqps://u:p@[::1]:5671/%2f"), "[::1]");
        assert_eq!(host_of("amqps://[fe80::1]/%2f"), "[fe80::1]");
        assert_eq!(host_of("not a url"), "");
    }
}
