//! [`Secret`]: a string that never shows in logs, status output or errors, and URL redaction.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// A string that never shows in logs, status output or errors.
///
/// Deserializes from a string, or from a number or boolean (taken as its text), so that a
/// numeric password in a TOML file or the environment is not a type error that would echo it.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_scalar(d).map(Secret)
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; use only where it is sent to the peer that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// What may be shown: `""` when empty, a URL with its password replaced by `***`, or `***`.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else if self.0.contains("://") {
            redact_url(&self.0)
        } else {
            "***".into()
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// `scheme://user:pass@host/...` with the password replaced by `***`; a user without a
/// password is shown as it is, and text that is no URL as `***`.
///
/// The URL is read by the `url` crate (the parser lapin and mysql_async read it with). Text it
/// does not read unambiguously (an invalid port, a password with an unencoded `/`, `?` or `#`,
/// which ends the authority early and leaves an `@` behind it) is split at its last `@`
/// instead, everything before it taken as credentials: an odd URL is over-redacted, never
/// leaked.
pub fn redact_url(raw: &str) -> String {
    if let Some(mut u) = parsed(raw) {
        if u.password().is_some() {
            // cannot fail: a URL with a password has a host
            let _ = u.set_password(Some("***"));
        }
        return u.into();
    }
    match credentials_by_last_at(raw) {
        None if raw.contains("://") => raw.to_string(),
        None => "***".into(),
        Some((scheme, user, password, host)) => {
            let hidden = if password.is_some() { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}")
        }
    }
}

/// The password of a URL (as written, percent-encoding kept), read as [`redact_url`] reads it;
/// for scrubbing it from a parser's message that might quote it.
pub fn url_password(raw: &str) -> Option<String> {
    match parsed(raw) {
        Some(u) => u.password().map(str::to_string),
        None => credentials_by_last_at(raw)?.2.map(str::to_string),
    }
}

/// `raw` as a URL with a host, unless an `@` follows its authority (then the parser may have
/// taken part of a password for the host and the rest for the path).
fn parsed(raw: &str) -> Option<url::Url> {
    let u = url::Url::parse(raw).ok()?;
    (u.has_host() && !u[url::Position::BeforePath..].contains('@')).then_some(u)
}

/// The conservative reading of text the URL parser does not take: scheme, user, password and
/// what follows the last `@`; `None` without `://` or without `@`.
fn credentials_by_last_at(raw: &str) -> Option<(&str, &str, Option<&str>, &str)> {
    let (scheme, rest) = raw.split_once("://")?;
    let (userinfo, host) = rest.rsplit_once('@')?;
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    Some((scheme, user, password, host))
}

/// A string field that also accepts a number or a boolean (as its text): `client_id = 1001`.
pub fn string_or_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}
