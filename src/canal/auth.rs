//! Canal's password scramble (the MySQL 4.1 `mysql_native_password` construction with an
//! 8-byte seed), and the hash the server stores.
//!
//! The server keeps `canal.passwd = hex(SHA1(SHA1(password)))`. The client sends
//! `hex(SHA1(seed ‖ SHA1(SHA1(password))) XOR SHA1(password))` as ASCII bytes.

use sha1::{Digest, Sha1};

/// The token a client sends for `password` given the handshake `seed`: 40 lower-case hex
/// characters. An empty password yields an empty token (the server accepts that only when it
/// has no password configured).
pub fn scramble(password: &str, seed: &[u8]) -> String {
    if password.is_empty() {
        return String::new();
    }
    let stage1 = Sha1::digest(password.as_bytes());
    let stage2 = Sha1::digest(stage1);
    let mut h = Sha1::new();
    h.update(seed);
    h.update(stage2);
    let mask = h.finalize();
    let token: Vec<u8> = mask.iter().zip(stage1.iter()).map(|(a, b)| a ^ b).collect();
    hex::encode(token)
}

/// The value for the server's `canal.passwd`: upper-case hex of SHA1(SHA1(password)).
pub fn server_password_hash(password: &str) -> String {
    hex::encode_upper(Sha1::digest(Sha1::digest(password.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_known_vectors() {
        assert_eq!(
            server_password_hash("canal"),
            "E3619321C1A937C46A0D8BD1DAC39F93B27D4458"
        );
        assert_eq!(
            server_password_hash("admin"),
            "4ACFE3202A5FF5CF467898FC58AAB1D615029441"
        );
        assert_eq!(
            scramble("canal", &[1, 2, 3, 4, 5, 6, 7, 8]),
            "7de44690d8e53782cb61804a2455c284a3bbfb06"
        );
        assert_eq!(scramble("", &[1, 2, 3]), "");
    }
}
