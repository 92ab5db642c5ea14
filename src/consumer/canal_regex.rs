//! Our name patterns (Rust `regex` syntax) rewritten for Canal's subscription filter.
//!
//! What Canal does with a subscription filter (canal.filter 1.1.7, `AviaterRegexFilter`): it
//! splits the string at **every** comma (1.1.8 only at commas outside `{}`, `[]`, `()`), wraps
//! each piece as `^piece$`, joins them with `|`, and matches the result with Jakarta ORO's
//! `Perl5Matcher.matches` (Perl 5 syntax, case-insensitive) against the lower-cased
//! `schema.table` of every binlog event. Names are Java strings (UTF-16).
//!
//! A Rust pattern sent verbatim therefore breaks in four ways: a top-level `a|b` is not
//! grouped (`db\.a|b` becomes `^db\.a|b$`), `{1,2}` is cut at its comma, `\p{..}` is a literal
//! `p{..}` to ORO, and `^`/`$` inside the fragment can never match. So we do not send the
//! user's text: we parse it into `regex_syntax`'s HIR (exactly what our own matcher runs) and
//! print that in the subset of Perl 5 syntax ORO reads the same way:
//! - groups become `(?:..)`, alternations are always grouped;
//! - every ASCII character other than letters, digits and `_` is written `\xHH`, so the
//!   output never contains a comma (or any other character with a special meaning);
//! - classes are written as explicit ranges; characters outside the BMP are dropped from them
//!   (MySQL identifiers are limited to U+0001..U+FFFF, so such a character never occurs in a
//!   name), and a class with many non-ASCII ranges (`\p{L}`, Unicode `\w`) keeps its ASCII
//!   ranges exactly and covers its non-ASCII part with one range;
//! - `{n,m}` is written without a comma as `(?:x){n}(?:x(?:x)?)?`; very wide bounded
//!   repetitions become `(?:x){n}(?:x)*`;
//! - anchors and word-boundary assertions are dropped (Canal anchors each piece itself).
//!
//! Every rewrite yields the same language or a larger one, never a smaller one: a name our
//! matcher accepts always passes Canal's filter, so no row a consumer wants is filtered away
//! on the server. The few names Canal lets through in excess (only possible with word
//! boundaries, anchors in the middle of a pattern, non-ASCII classes or huge repetitions) are
//! dropped by our own matcher.

use regex_syntax::hir::{Class, Hir, HirKind};

/// More non-ASCII ranges than this in one class are covered by a single range.
const MAX_NON_ASCII_RANGES: usize = 8;
/// A bounded repetition with more optional copies than this becomes unbounded.
const MAX_OPTIONAL_COPIES: u32 = 16;
/// Canal filters are sent with every subscription and compiled per pattern; refuse absurd ones.
pub const MAX_CANAL_REGEX_LEN: usize = 4096;

/// The Canal filter fragment for a pattern matched against a whole name, or why there is none.
pub fn translate(pattern: &str) -> Result<String, String> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    emit(&hir, &mut out);
    if out.len() > MAX_CANAL_REGEX_LEN {
        return Err(format!(
            "its form for Canal's filter is {} bytes long (the limit is {MAX_CANAL_REGEX_LEN}); \
             simplify the pattern",
            out.len()
        ));
    }
    debug_assert!(!out.contains(','), "{out}");
    Ok(out)
}

/// An exact name as a Canal filter fragment.
pub fn literal(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        push_char(c, &mut out);
    }
    out
}

fn push_char(c: char, out: &mut String) {
    if c.is_ascii_alphanumeric() || c == '_' {
        out.push(c);
    } else if c.is_ascii() {
        out.push_str(&format!("\\x{:02x}", c as u32));
    } else {
        // ORO compares non-ASCII characters as they are (case-insensitively, like Canal).
        out.push(c);
    }
}

/// Writes `hir` so that it can be followed by a quantifier.
fn emit_atom(hir: &Hir, out: &mut String) {
    let single = match hir.kind() {
        HirKind::Literal(l) => std::str::from_utf8(&l.0).is_ok_and(|s| s.chars().count() == 1),
        HirKind::Class(_) => true,
        // emit() groups alternations itself
        HirKind::Alternation(_) => true,
        HirKind::Capture(c) => {
            return emit_atom(&c.sub, out);
        }
        _ => false,
    };
    if single {
        emit(hir, out);
    } else {
        out.push_str("(?:");
        emit(hir, out);
        out.push(')');
    }
}

fn emit(hir: &Hir, out: &mut String) {
    match hir.kind() {
        HirKind::Empty => {}
        // Assertions only narrow a match: dropping them widens the filter, never narrows it.
        HirKind::Look(_) => {}
        HirKind::Literal(l) => {
            for c in String::from_utf8_lossy(&l.0).chars() {
                push_char(c, out);
            }
        }
        HirKind::Class(class) => emit_class(class, out),
        HirKind::Capture(c) => emit(&c.sub, out),
        HirKind::Concat(parts) => {
            for p in parts {
                emit(p, out);
            }
        }
        HirKind::Alternation(branches) => {
            out.push_str("(?:");
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                emit(b, out);
            }
            out.push(')');
        }
        HirKind::Repetition(r) => {
            // Greediness does not change which whole names match.
            let mut atom = String::new();
            emit_atom(&r.sub, &mut atom);
            match (r.min, r.max) {
                (0, Some(0)) => {}
                (0, None) => {
                    out.push_str(&atom);
                    out.push('*');
                }
                (1, None) => {
                    out.push_str(&atom);
                    out.push('+');
                }
                (0, Some(1)) => {
                    out.push_str(&atom);
                    out.push('?');
                }
                (n, max) => {
                    if n == 1 {
                        out.push_str(&atom);
                    } else if n > 1 {
                        out.push_str(&format!("{atom}{{{n}}}"));
                    }
                    match max {
                        None => {
                            out.push_str(&atom);
                            out.push('*');
                        }
                        Some(m) if m - n > MAX_OPTIONAL_COPIES => {
                            out.push_str(&atom);
                            out.push('*');
                        }
                        Some(m) => {
                            // x{n,m} = x{n} then (m-n) nested optional copies: no comma.
                            let extra = m - n;
                            for _ in 0..extra {
                                out.push_str("(?:");
                                out.push_str(&atom);
                            }
                            for _ in 0..extra {
                                out.push_str(")?");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Inclusive code point ranges of a class, restricted to U+0001..U+FFFF.
fn class_ranges(class: &Class) -> Vec<(u32, u32)> {
    let raw: Vec<(u32, u32)> = match class {
        Class::Unicode(c) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        Class::Bytes(c) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
    };
    raw.into_iter()
        .filter_map(|(lo, hi)| {
            let (lo, hi) = (lo.max(1), hi.min(0xffff));
            (lo <= hi).then_some((lo, hi))
        })
        .collect()
}

fn emit_class(class: &Class, out: &mut String) {
    let ranges = class_ranges(class);
    if ranges.is_empty() {
        // Matches no name; a negative look-ahead of nothing never matches.
        out.push_str("(?!)");
        return;
    }
    // Everything except (perhaps) a newline: ORO's `.` (single-line mode) is a superset.
    let covered: u32 = ranges.iter().map(|(lo, hi)| hi - lo + 1).sum();
    let surrogates = 0xdfff - 0xd800 + 1;
    if covered + surrogates >= 0xffff - 1 {
        out.push('.');
        return;
    }
    let mut ascii = Vec::new();
    let mut wide = Vec::new();
    for (lo, hi) in ranges {
        if hi <= 0x7f {
            ascii.push((lo, hi));
        } else if lo <= 0x7f {
            ascii.push((lo, 0x7f));
            wide.push((0x80, hi));
        } else {
            wide.push((lo, hi));
        }
    }
    if wide.len() > MAX_NON_ASCII_RANGES {
        let lo = wide.first().map(|r| r.0).unwrap_or(0x80);
        let hi = wide.last().map(|r| r.1).unwrap_or(0xffff);
        wide = vec![(lo, hi)];
    }
    out.push('[');
    for (lo, hi) in ascii {
        out.push_str(&format!("\\x{lo:02x}"));
        if hi > lo {
            out.push_str(&format!("-\\x{hi:02x}"));
        }
    }
    for (lo, hi) in wide {
        // Between 0x80 and 0xffff but outside the surrogates: always a char.
        let c = |v: u32| char::from_u32(v).unwrap_or('\u{fffd}');
        out.push(c(lo));
        if hi > lo {
            out.push('-');
            out.push(c(hi));
        }
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternation_is_grouped() {
        assert_eq!(translate("t_a|t_b").unwrap(), "(?:t_a|t_b)");
        assert_eq!(translate("orders|users").unwrap(), "(?:orders|users)");
        assert_eq!(translate("(a)(b)").unwrap(), "ab");
        assert_eq!(translate("(ab|cd)+x").unwrap(), "(?:ab|cd)+x");
        assert_eq!(translate("(ab)+").unwrap(), "(?:ab)+");
    }

    #[test]
    fn counted_repetitions_have_no_comma() {
        assert_eq!(translate("x{1,2}").unwrap(), "x(?:x)?");
        assert_eq!(translate("x{2,4}").unwrap(), "x{2}(?:x(?:x)?)?");
        assert_eq!(translate("x{3}").unwrap(), "x{3}");
        assert_eq!(translate("x{2,}").unwrap(), "x{2}x*");
        assert_eq!(translate("(ab){0,1}").unwrap(), "(?:ab)?");
        // wide bounds are widened to unbounded
        assert_eq!(translate("x{1,100}").unwrap(), "xx*");
        assert_eq!(
            translate("t_[0-9]{1,3}").unwrap(),
            r"t_[\x30-\x39](?:[\x30-\x39](?:[\x30-\x39])?)?"
        );
        assert_eq!(translate("a,b").unwrap(), r"a\x2cb");
    }

    #[test]
    fn anchors_and_boundaries_are_dropped() {
        assert_eq!(translate("^t$").unwrap(), "t");
        assert_eq!(translate("^(?:a|b)$").unwrap(), r"[\x61-\x62]");
        assert_eq!(translate(r"\bt\b").unwrap(), "t");
    }

    #[test]
    fn classes_are_explicit_ranges() {
        assert_eq!(translate("[a-z_]+").unwrap(), r"[\x5f\x61-\x7a]+");
        assert_eq!(translate("t.*").unwrap(), "t.*");
        // Unicode letters: ASCII letters exact, the rest covered by one range
        assert_eq!(translate(r"\p{L}+").unwrap(), r"[\x41-\x5a\x61-\x7aª-ￜ]+");
        assert_eq!(translate(r"\d").unwrap(), r"[\x30-\x39٠-９]");
        assert_eq!(translate("caf[éè]").unwrap(), "caf[è-é]");
        assert_eq!(translate(r"t\-1").unwrap(), r"t\x2d1");
        assert_eq!(translate("(?i)ab").unwrap(), r"[\x41\x61][\x42\x62]");
        // outside the BMP: no MySQL identifier has it
        assert_eq!(translate("[😀-😂]").unwrap(), "(?!)");
    }

    /// The printed form, read as Canal reads it (anchored, case-insensitive, against the
    /// lower-cased name; Rust's regex parses this Perl 5 subset the same way), accepts every
    /// name the pattern accepts.
    #[test]
    fn the_canal_form_accepts_every_name_the_pattern_accepts() {
        let patterns = [
            "t_a|t_b",
            "x{1,2}",
            "x{2,}",
            "x{3}",
            "(ab|c){1,3}d?",
            r"\p{L}+",
            "^t$",
            r"\bt\b",
            "orders_[0-9]{2,4}",
            r"o_\d+",
            r"\w{2,3}",
            "[^_]+_x",
            "(?i)users",
            "Users",
            "a,b",
            "a.b",
            r"caf\u{e9}|na[ïi]ve",
            "[a-c]*z{0,1}",
            "(x|xy|xyz)+",
            ".*",
            r"[\-\]\\^]+",
            "t.{1,20}",
        ];
        let names = [
            "t_a",
            "t_b",
            "t_c",
            "x",
            "xx",
            "xxx",
            "xxxx",
            "abd",
            "cccd",
            "ababab",
            "café",
            "straße",
            "t",
            "tt",
            "orders_12",
            "orders_12345",
            "o_7",
            "o_٣",
            "ab",
            "abc",
            "abcd",
            "a_x",
            "_x",
            "USERS",
            "users",
            "Users",
            "a,b",
            "a.b",
            "aXb",
            "naïve",
            "naive",
            "abcz",
            "xyxyz",
            "",
            "-]\\^",
            "t1234567890",
            "日本",
        ];
        for p in patterns {
            let ours = regex::Regex::new(&format!("^(?:{p})$")).unwrap();
            let form = translate(p).unwrap();
            let canal = regex::RegexBuilder::new(&format!("^{form}$"))
                .case_insensitive(true)
                .build()
                .unwrap_or_else(|e| panic!("{p} -> {form}: {e}"));
            for n in names {
                if ours.is_match(n) {
                    assert!(
                        canal.is_match(&n.to_lowercase()),
                        "{p:?} matches {n:?} but its Canal form {form:?} does not"
                    );
                }
            }
        }
    }

    #[test]
    fn literals_escape_ascii_punctuation() {
        assert_eq!(literal("test_db"), "test_db");
        assert_eq!(literal("my-db.x"), "my\\x2ddb\\x2ex");
        assert_eq!(literal("café"), "café");
    }

    #[test]
    fn oversized_forms_are_refused() {
        let p = "(x{16}y){0,16}".repeat(20);
        let err = translate(&p).unwrap_err();
        assert!(err.contains("bytes long"), "{err}");
        assert!(translate("(").is_err());
    }
}
