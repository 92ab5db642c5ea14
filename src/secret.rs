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

/// `scheme://user:pass@host/...` with the password replaced by `***`. Anything before the last
/// `@` is treated as credentials, so an odd URL is over-redacted rather than leaked; a user
/// without a password is shown as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    match rest.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{}", &rest[at + 1..])
        }
    }
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
