//! Every row a consumer wants arrives, exactly as written: table patterns as Canal
//! subscriptions, BINARY padding, DDL made while Canal was down, large BLOBs. Against the real
//! Canal server and MariaDB of `deploy/local/up` (run under `flock /tmp/cc-stack.lock`).

mod common;

use canal_consumer::consumer::filter::{NameMatch, TableFilter, canal_filter};
use canal_consumer::event::{ChangeEvent, Value};
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

/// The tables seen among row events, as `db.table`.
fn tables(events: &[ChangeEvent]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| format!("{}.{}", e.database, e.table))
        .collect()
}

/// One database per pattern form, so one form cannot hide another's failure: every table is
/// created, one row inserted into each (matching ones and not), then a marker row into the
/// last matching table. The subscription is the union of the filters, as the service sends it.
#[tokio::test]
async fn every_table_a_pattern_matches_is_delivered_by_canal() {
    let _lock = canal_lock().await;
    // (database, table_pattern, tables it matches, tables it does not)
    let forms: &[(&str, &str, &[&str], &[&str])] = &[
        ("cc_f_alt", "t_a|t_b", &["t_a", "t_b"], &["t_c"]),
        ("cc_f_rep", "x{1,2}", &["x", "xx"], &["xxx"]),
        ("cc_f_uni", r"\p{L}+", &["café", "straße", "abc"], &["t1"]),
        ("cc_f_anc", "^t$", &["t"], &["tt"]),
        (
            "cc_f_grp",
            "(o|p)_[0-9]{2,3}",
            &["o_12", "p_123"],
            &["o_1", "p_1234"],
        ),
    ];
    let mut sql = String::new();
    for (db, _, yes, no) in forms {
        sql.push_str(&format!(
            "DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db} DEFAULT CHARSET utf8mb4;"
        ));
        for t in yes.iter().chain(no.iter()) {
            sql.push_str(&format!("CREATE TABLE {db}.`{t}` (id INT PRIMARY KEY);"));
        }
    }
    mysql(&sql);
    let filters: Vec<TableFilter> = forms
        .iter()
        .map(|(db, pattern, yes, no)| {
            let f = TableFilter {
                database: NameMatch::exact(db),
                table: NameMatch::pattern(pattern).expect("pattern loads"),
                event_types: Default::default(),
            };
            // our own matcher agrees with the table lists
            for t in *yes {
                assert!(f.table.matches(t), "{pattern} should match {t}");
            }
            for t in *no {
                assert!(!f.table.matches(t), "{pattern} should not match {t}");
            }
            f
        })
        .collect();
    let subscription = canal_filter(&filters);
    let mut tap = Tap::clean(&subscription).await;

    let mut sql = String::new();
    for (db, _, yes, no) in forms {
        for t in no.iter().chain(yes.iter()) {
            sql.push_str(&format!("INSERT INTO {db}.`{t}` VALUES (1);"));
        }
    }
    // binlog order: once the marker arrives, every earlier row Canal lets through has too
    sql.push_str("INSERT INTO cc_f_grp.`p_123` VALUES (2);");
    mysql(&sql);
    let dbs: BTreeSet<&str> = forms.iter().map(|f| f.0).collect();
    let (events, _) = tap
        .collect_matching(
            true,
            Duration::from_secs(60),
            |e| !e.is_ddl && dbs.contains(e.database.as_str()),
            |ev| {
                ev.iter()
                    .any(|e| e.table == "p_123" && e.data.get("id") == Some(&Value::Int(2)))
            },
        )
        .await;
    let got = tables(&events);
    for (db, pattern, yes, no) in forms {
        for t in *yes {
            assert!(
                got.contains(&format!("{db}.{t}")),
                "pattern {pattern:?} (sent as {subscription:?}): row of {db}.{t} not delivered; got {got:?}"
            );
        }
        for t in *no {
            // Canal may deliver more than we match (never less); these forms are exact
            assert!(
                !got.contains(&format!("{db}.{t}")),
                "pattern {pattern:?}: {db}.{t} delivered although it does not match"
            );
        }
    }
}
