//! Tests of the rules layer: schema validation errors (file and key path), CEL conditions and
//! helpers, payload templates, error policies, and the exact triggers of the shipped consumers.
//!
//! (Why this file is long: it is only tests, one file for the whole rules layer so that each
//! case keeps one name; no production code lives here.)

use super::*;
use crate::event::{ChangeEvent, ColumnSet, EventType, Position, Row, Value};
use crate::trigger::{Priority, SourceRef, message_id};
use serde_json::json;
use std::path::Path;

const FILE: &str = "config/consumers/t.toml";

fn parse(text: &str) -> Result<Vec<ConsumerSpec>, RulesError> {
    parse_file(Path::new(FILE), text)
}

fn one(text: &str) -> ConfigConsumer {
    let mut specs = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(specs.len(), 1);
    ConfigConsumer::new(specs.remove(0))
}

/// A consumer `c` on `db.t` (all row events) with the given rule body appended.
fn with_rule(rule: &str) -> String {
    format!(
        r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table = "t"
[[consumers.c.rules]]
{rule}
"#
    )
}

fn expect_err(text: &str, key: &str, needle: &str) {
    let e = parse(text)
        .expect_err("config must be rejected")
        .to_string();
    assert!(
        e.starts_with(&format!("{FILE}: {key}: ")),
        "error {e:?} does not name {FILE} and key {key}"
    );
    assert!(e.contains(needle), "error {e:?} lacks {needle:?}");
}

fn row(cols: &[(&str, Value)]) -> Row {
    cols.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn event(db: &str, table: &str, t: EventType, data: Row, old: Option<Row>) -> ChangeEvent {
    let changed = match (&old, t) {
        (Some(o), _) => o.keys().collect(),
        (None, EventType::Insert) => data.keys().collect(),
        _ => ColumnSet::new(),
    };
    ChangeEvent {
        destination: "example".into(),
        database: db.into(),
        table: table.into(),
        event_type: t,
        data,
        old,
        changed,
        primary_keys: ["id"].into(),
        position: Position {
            log_file: "mysql-bin.000007".into(),
            offset: 1234,
            row_index: 2,
            server_id: 1,
            gtid: None,
        },
        executed_at: 1_700_000_000_123,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

fn run(c: &mut ConfigConsumer, events: &[ChangeEvent]) -> TestRun {
    run_on_events(c, events)
}

// ---------------------------------------------------------------------------------------------
// bad configs: every one names the file and the key

#[test]
fn a_condition_known_at_load_not_to_be_a_boolean_is_refused() {
    let key = "consumers.c.rules[0].when.condition";
    for (cond, needle) in [
        ("1", "is always an int (1), not a boolean"),
        ("'yes'", "is always a string (yes), not a boolean"),
        ("1 + 2", "is always an int (3), not a boolean"),
        ("[true]", "is always a list"),
        ("1 / 0", "fails for every row"),
    ] {
        expect_err(
            &with_rule(&format!(
                "name = \"r\"\nplugin = \"p\"\nwhen = {{ condition = \"{cond}\" }}"
            )),
            key,
            needle,
        );
    }
    // booleans, and anything that reads the row or uses a helper, are for the row to decide
    for cond in [
        "true",
        "1 < 2",
        "data.id == 1",
        "changed('id')",
        "has(data.id)",
    ] {
        let text = with_rule(&format!(
            "name = \"r\"\nplugin = \"p\"\nwhen = {{ condition = \"{cond}\" }}"
        ));
        parse(&text).unwrap_or_else(|e| panic!("{cond}: {e}"));
    }
}

#[test]
fn cel_syntax_error_names_condition_key() {
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\nwhen = { condition = \"data.id ==\" }"),
        "consumers.c.rules[0].when.condition",
        "syntax error",
    );
}

#[test]
fn unknown_variable_and_function_are_rejected() {
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\nwhen = { condition = \"dat.id == 1\" }"),
        "consumers.c.rules[0].when.condition",
        "unknown variable `dat`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\nwhen = { condition = \"frobnicate(data.id)\" }"),
        "consumers.c.rules[0].when.condition",
        "unknown function `frobnicate`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\npayload = { a = { b = \"${nope}\" } }"),
        "consumers.c.rules[0].payload.a.b",
        "unknown variable `nope`",
    );
}

#[test]
fn standard_functions_macros_and_helpers_are_accepted() {
    for cond in [
        "size(data) > 0 && data.name.startsWith('a') && data.name.matches('^a')",
        "int(data.n) + 1 > 2 && string(data.id) != '' && type(data.id) == int",
        "changed.exists(c, c == 'status') && data.all(k, k != '') && [1, 2].map(x, x * 2)[0] == 2",
        "changed('status') || transition('status', 'a', 'b') || size(primary_key()) > 0",
        "has(data.id) && 'id' in data && position.offset > 0 && executed_at > 0",
    ] {
        let text = with_rule(&format!(
            "name = \"r\"\nplugin = \"p\"\nwhen = {{ condition = \"{cond}\" }}"
        ));
        parse(&text).unwrap_or_else(|e| panic!("{cond}: {e}"));
    }
}

#[test]
fn malformed_template_names_the_payload_key() {
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\npayload = { user_id = \"${data.id\" }"),
        "consumers.c.rules[0].payload.user_id",
        "unterminated",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\npayload = { ids = [1, \"${data.id +}\"] }"),
        "consumers.c.rules[0].payload.ids[1]",
        "syntax error",
    );
}

#[test]
fn unknown_event_types_are_rejected_in_filters_and_rules() {
    let text = r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table = "t"
events = ["INSERT", "UPSERT"]
"#;
    expect_err(
        text,
        "consumers.c.filters[0].events",
        "unknown event type \"UPSERT\"",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\nwhen = { events = \"CHANGE\" }"),
        "consumers.c.rules[0].when.events",
        "unknown event type",
    );
}

#[test]
fn bad_regex_is_rejected() {
    let text = r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table_pattern = "orders_(\\d+"
"#;
    expect_err(text, "consumers.c.filters[0].table_pattern", "bad regex");
}

#[test]
fn a_pattern_canal_cannot_carry_is_rejected_at_load() {
    // 20 x 16 x 16 nested optional copies: far beyond what we send Canal in one subscription
    let text = format!(
        "[consumers.c]\n[[consumers.c.filters]]\ndatabase_pattern = 'db'\ntable_pattern = '{}'\n",
        "(x{16}y){0,16}".repeat(20)
    );
    expect_err(
        &text,
        "consumers.c.filters[0].table_pattern",
        "cannot be expressed as a Canal subscription filter",
    );
}

#[test]
fn patterns_canal_reads_differently_load_and_keep_their_meaning() {
    let text = r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table_pattern = "t_a|t_b"
[[consumers.c.filters]]
database_pattern = "^db$"
table_pattern = "x{1,2}"
"#;
    let specs = parse(text).expect("loads");
    let f = &specs[0].filters;
    assert_eq!(f[0].canal_regex(), "db\\.(?:t_a|t_b)");
    assert_eq!(f[1].canal_regex(), "db\\.x(?:x)?");
    assert!(f[0].table.matches("t_b") && !f[0].table.matches("db.t_b"));
    assert!(f[1].table.matches("xx") && !f[1].table.matches("xxx"));
}

#[test]
fn missing_plugin_unknown_priority_policy_and_keys() {
    expect_err(
        &with_rule("name = \"r\""),
        "consumers.c.rules[0]",
        "missing field `plugin`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\npriority = \"urgent\""),
        "consumers.c.rules[0].priority",
        "unknown variant `urgent`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\non_error = \"ignore\""),
        "consumers.c.rules[0].on_error",
        "unknown variant `ignore`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"p\"\nwhen = { tabel = \"t\" }"),
        "consumers.c.rules[0].when.tabel",
        "unknown field `tabel`",
    );
    expect_err(
        &with_rule("name = \"r\"\nplugin = \"  \""),
        "consumers.c.rules[0].plugin",
        "must not be empty",
    );
}

#[test]
fn duplicate_rule_names_and_missing_filters() {
    let text = format!(
        "{}\n[[consumers.c.rules]]\nname = \"r\"\nplugin = \"q\"\n",
        with_rule("name = \"r\"\nplugin = \"p\"")
    );
    expect_err(&text, "consumers.c.rules[1].name", "already defined");
    expect_err(
        "[consumers.c]\ndescription = \"x\"\n",
        "consumers.c.filters",
        "at least one",
    );
}

#[test]
fn rules_that_can_never_fire_are_rejected() {
    let text = r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table = "users"
events = ["INSERT", "UPDATE"]
[[consumers.c.filters]]
database = "db"
table = "orders"
events = "INSERT"
[[consumers.c.rules]]
name = "r"
plugin = "p"
when = { table = "orders", events = "DELETE" }
"#;
    expect_err(text, "consumers.c.rules[0].when", "can never fire");
    expect_err(
        &text.replace(
            "table = \"orders\", events = \"DELETE\"",
            "table = \"user\"",
        ),
        "consumers.c.rules[0].when",
        "can never fire",
    );
    parse(&text.replace("events = \"DELETE\"", "events = [\"DELETE\", \"INSERT\"]")).unwrap();
    parse(&text.replace(
        "table = \"orders\", events = \"DELETE\"",
        "table = \"USERS\"",
    ))
    .unwrap();
}

#[test]
fn toml_syntax_errors_name_file_and_line() {
    let e = parse("[consumers.c]\nenabled = \n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(FILE), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn duplicate_consumer_names_across_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let body = with_rule("name = \"r\"\nplugin = \"p\"");
    std::fs::write(dir.path().join("a.toml"), &body).unwrap();
    std::fs::write(dir.path().join("b.toml"), &body).unwrap();
    std::fs::write(dir.path().join("README.md"), "not a consumer").unwrap();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("b.toml: consumers.c:"), "{e}");
    assert!(e.contains("a.toml"), "{e}");
    std::fs::remove_file(dir.path().join("b.toml")).unwrap();
    assert_eq!(load_dir(dir.path()).unwrap().len(), 1);
    assert!(matches!(
        load_dir(&dir.path().join("missing")),
        Err(RulesError::Io { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// conditions

fn fires(condition: &str, e: &ChangeEvent) -> bool {
    let mut c = one(&with_rule(&format!(
        "name = \"r\"\nplugin = \"p\"\non_error = \"stop\"\nwhen = {{ condition = \"{condition}\" }}"
    )));
    let out = run(&mut c, std::slice::from_ref(e));
    assert_eq!(out.stopped, None, "{condition}");
    !out.triggers.is_empty()
}

#[test]
fn changed_and_transition_helpers() {
    let paid = event(
        "db",
        "t",
        EventType::Update,
        row(&[
            ("id", Value::Int(1)),
            ("status", Value::Text("paid".into())),
            ("level", Value::UInt(3)),
        ]),
        Some(row(&[
            ("status", Value::Text("pending".into())),
            ("level", Value::UInt(2)),
        ])),
    );
    assert!(fires("changed('status')", &paid));
    assert!(!fires("changed('id')", &paid));
    assert!(fires("transition('status', 'pending', 'paid')", &paid));
    assert!(!fires("transition('status', 'new', 'paid')", &paid));
    assert!(!fires("transition('status', 'paid', 'pending')", &paid));
    assert!(
        fires("transition('level', 2, 3)", &paid),
        "int literals match uint columns"
    );
    assert!(!fires("transition('id', 1, 1)", &paid));
    assert!(fires(
        "old.status == 'pending' && data.status == 'paid'",
        &paid
    ));
    assert!(fires(
        "'status' in changed && event_type == 'UPDATE'",
        &paid
    ));

    let insert = event(
        "db",
        "t",
        EventType::Insert,
        row(&[
            ("id", Value::Int(1)),
            ("status", Value::Text("paid".into())),
        ]),
        None,
    );
    assert!(
        !fires("changed('status')", &insert),
        "only UPDATEs change columns"
    );
    assert!(!fires("transition('status', 'pending', 'paid')", &insert));
    assert!(fires("size(old) == 0 && data.status == 'paid'", &insert));
    assert!(fires(
        "position.log_file == 'mysql-bin.000007' && position.offset == 1234 && position.row_index == 2",
        &insert
    ));
    assert!(fires(
        "database == 'db' && table == 't' && primary_keys == ['id']",
        &insert
    ));
    assert!(fires("data.id == 1 && primary_key() == {'id': 1}", &insert));
}

#[test]
fn null_and_json_columns_in_conditions() {
    let e = event(
        "db",
        "t",
        EventType::Insert,
        row(&[
            ("id", Value::Int(1)),
            ("deleted_at", Value::Null),
            (
                "attrs",
                Value::Json(json!({"tags": ["a", "b"], "vip": true})),
            ),
            ("blob", Value::Bytes(vec![0, 1])),
        ]),
        None,
    );
    assert!(fires("data.deleted_at == null", &e));
    assert!(fires("data.attrs.vip && 'b' in data.attrs.tags", &e));
    assert!(fires("data.blob == b'\\x00\\x01'", &e));
    assert!(fires("sql == null", &e));
}

// ---------------------------------------------------------------------------------------------
// templates

#[test]
fn templates_keep_types_and_interpolate_text() {
    let mut c = one(&with_rule(
        r#"name = "r"
plugin = "p"
[consumers.c.rules.payload]
id = "${data.id}"
big = "${data.big}"
ratio = "${data.ratio}"
missing = "${data.deleted_at}"
blob = "${data.blob}"
json = "${data.attrs}"
text = "user ${data.id} is ${data.name}, gone ${data.deleted_at}."
padded = "  ${data.id}  "
escaped = "$${data.id} costs $5"
literal_int = 5
literal_bool = true
literal_list = [1, "two", 3.5]
mixed_list = ["${data.id}", "x"]
nested = { where = "${table}", at = "${position.offset}" }
sum = "${data.id + 1}"
"#,
    ));
    let e = event(
        "db",
        "t",
        EventType::Insert,
        row(&[
            ("id", Value::Int(42)),
            ("big", Value::UInt(u64::MAX)),
            ("ratio", Value::Float(0.5)),
            ("name", Value::Text("ann".into())),
            ("deleted_at", Value::Null),
            ("blob", Value::Bytes(vec![0xff, 0])),
            ("attrs", Value::Json(json!({"a": [1, null]}))),
        ]),
        None,
    );
    let out = run(&mut c, &[e]);
    assert_eq!(out.triggers.len(), 1);
    assert_eq!(
        out.triggers[0].payload,
        json!({
            "id": 42,
            "big": u64::MAX,
            "ratio": 0.5,
            "missing": null,
            "blob": {"base64": "/wA="},
            "json": {"a": [1, null]},
            "text": "user 42 is ann, gone .",
            "padded": 42,
            "escaped": "${data.id} costs $5",
            "literal_int": 5,
            "literal_bool": true,
            "literal_list": [1, "two", 3.5],
            "mixed_list": [42, "x"],
            "nested": {"where": "t", "at": 1234},
            "sum": 43,
        })
    );
}

#[test]
fn whole_payload_expression_and_default_payload() {
    let mut c = one(&format!(
        "{}\n[[consumers.c.rules]]\nname = \"s\"\nplugin = \"q\"\n",
        with_rule("name = \"r\"\nplugin = \"p\"\npayload = \"${data}\"")
    ));
    let e = event(
        "db",
        "t",
        EventType::Delete,
        row(&[("id", Value::Int(9)), ("n", Value::Null)]),
        None,
    );
    let out = run(&mut c, &[e]);
    assert_eq!(out.triggers.len(), 2);
    assert_eq!(out.triggers[0].payload, json!({"id": 9, "n": null}));
    assert_eq!(out.triggers[1].payload, json!({}));
}

// ---------------------------------------------------------------------------------------------
// per-row errors and policies

fn failing(policy: &str) -> ConfigConsumer {
    one(&format!(
        "{}\n[[consumers.c.rules]]\nname = \"ok\"\nplugin = \"q\"\npayload = {{ id = \"${{data.id}}\" }}\n",
        with_rule(&format!(
            "name = \"bad\"\nplugin = \"p\"\non_error = \"{policy}\"\npayload = {{ x = \"${{data.nope}}\" }}"
        ))
    ))
}

fn users_row() -> ChangeEvent {
    event(
        "db",
        "t",
        EventType::Insert,
        row(&[("id", Value::Int(5))]),
        None,
    )
}

#[test]
fn error_handler_policy_triggers_error_handler_and_other_rules_still_fire() {
    let mut c = failing("error_handler");
    let e = users_row();
    let out = run(&mut c, std::slice::from_ref(&e));
    assert_eq!(out.stopped, None);
    assert_eq!(out.triggers.len(), 2);
    let t = &out.triggers[0];
    assert_eq!(t.plugin, "error_handler");
    assert_eq!(t.rule.as_deref(), Some("bad"));
    assert_eq!(t.payload["consumer"], "c");
    assert_eq!(t.payload["rule"], "bad");
    assert_eq!(t.payload["event"], e.to_json());
    let msg = t.payload["error"].as_str().unwrap();
    assert!(msg.contains("payload.x") && msg.contains("nope"), "{msg}");
    assert_eq!(
        t.id,
        message_id(&SourceRef::from(&e), "c", Some("bad"), "error_handler", 0)
    );
    assert_eq!(out.triggers[1].plugin, "q");
    assert_eq!(out.triggers[1].payload, json!({"id": 5}));
}

#[test]
fn dead_letter_policy_publishes_to_the_dead_letter_route() {
    let mut c = failing("dead_letter");
    let out = run(&mut c, &[users_row()]);
    let t = &out.triggers[0];
    assert_eq!(t.plugin, DEAD_LETTER_PLUGIN);
    assert_eq!(t.route, default_dead_letter_route());
    assert_eq!(t.format, crate::trigger::MessageFormat::Envelope);
    assert_eq!(t.payload["rule"], "bad");
    assert_eq!(out.triggers.len(), 2);
}

#[test]
fn stop_policy_fails_the_event_with_nothing_published() {
    let mut c = failing("stop");
    let mut second = users_row();
    second.position.offset += 1;
    let out = run(&mut c, &[users_row(), second]);
    assert_eq!(out.triggers, vec![]);
    let (index, error) = out.stopped.expect("stopped");
    assert_eq!(index, 0);
    assert!(error.to_string().contains("rule `bad`"), "{error}");
    // the trait-level call returns Fatal
    let mut ctx =
        crate::consumer::ConsumerContext::new("c", Default::default(), Default::default());
    ctx.begin_event(&users_row());
    assert!(matches!(
        crate::consumer::Consumer::process_event(&mut c, &users_row(), &mut ctx),
        Err(crate::consumer::ConsumerError::Fatal(_))
    ));
}

#[test]
fn non_bool_condition_is_a_row_error() {
    let mut c = one(&with_rule(
        "name = \"r\"\nplugin = \"p\"\nwhen = { condition = \"data.id\" }",
    ));
    let out = run(&mut c, &[users_row()]);
    assert_eq!(out.triggers.len(), 1);
    assert_eq!(out.triggers[0].plugin, "error_handler");
    assert!(
        out.triggers[0].payload["error"]
            .as_str()
            .unwrap()
            .contains("not a bool")
    );
}

#[test]
fn consumer_level_defaults_apply_to_rules() {
    let text = r#"
[consumers.c]
priority = "low"
on_error = "dead_letter"
route = { exchange = "x", routing_key = "k" }
dead_letter_route = { routing_key = "dlq" }
format = { kind = "celery", task = "plugins.run" }
[[consumers.c.filters]]
database_pattern = "d.*"
table_pattern = "t_\\d+"
events = "ROW"
[[consumers.c.rules]]
name = "r"
plugin = "p"
[[consumers.c.rules]]
name = "s"
plugin = "p"
priority = "high"
route = { routing_key = "other" }
payload = { x = "${data.nope}" }
"#;
    let mut c = one(text);
    let mut e = users_row();
    e.database = "dx".into();
    e.table = "t_12".into();
    let out = run(&mut c, &[e]);
    assert_eq!(out.triggers.len(), 2);
    assert_eq!(out.triggers[0].priority, Priority::Low);
    assert_eq!(out.triggers[0].route.exchange, "x");
    assert!(matches!(
        out.triggers[0].format,
        crate::trigger::MessageFormat::Celery { .. }
    ));
    assert_eq!(out.triggers[1].plugin, DEAD_LETTER_PLUGIN);
    assert_eq!(out.triggers[1].route.routing_key, "dlq");
}

// ---------------------------------------------------------------------------------------------
// the shipped consumers

fn shipped() -> Vec<ConsumerSpec> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/consumers");
    load_dir(&dir).unwrap_or_else(|e| panic!("{e}"))
}

fn shipped_consumer(name: &str) -> ConfigConsumer {
    ConfigConsumer::new(
        shipped()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} not shipped")),
    )
}

#[test]
fn shipped_files_load() {
    let names: Vec<String> = shipped().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["example_consumer", "teacher_consumer"]);
}

#[test]
fn example_consumer_triggers_exactly_as_the_reference() {
    let mut c = shipped_consumer("example_consumer");
    let user = row(&[
        ("id", Value::Int(7)),
        ("email", Value::Text("a@b.c".into())),
    ]);
    let new_user = event("test_db", "users", EventType::Insert, user.clone(), None);
    let out = run(&mut c, std::slice::from_ref(&new_user));
    assert_eq!(out.triggers.len(), 1);
    let t = &out.triggers[0];
    assert_eq!(t.plugin, "email_service");
    assert_eq!(
        t.payload,
        json!({"operation": "send_welcome", "user_id": 7})
    );
    assert_eq!(t.priority, Priority::Normal);
    assert_eq!(t.consumer, "example_consumer");

    let updated_user = event(
        "test_db",
        "users",
        EventType::Update,
        user,
        Some(row(&[("email", Value::Text("old@b.c".into()))])),
    );
    let out = run(&mut c, std::slice::from_ref(&updated_user));
    assert_eq!(out.matched, 1, "updates are seen");
    assert!(out.triggers.is_empty(), "but trigger nothing");

    let order = row(&[
        ("id", Value::Int(1001)),
        ("amount", Value::Text("9.90".into())),
    ]);
    let new_order = event("test_db", "orders", EventType::Insert, order.clone(), None);
    let out = run(&mut c, std::slice::from_ref(&new_order));
    assert_eq!(out.triggers.len(), 1);
    let t = &out.triggers[0];
    assert_eq!(t.plugin, "order_processor");
    assert_eq!(
        t.payload,
        json!({"operation": "process_new_order", "order_id": 1001})
    );
    assert_eq!(t.priority, Priority::High);

    let deleted_order = event("test_db", "orders", EventType::Delete, order, None);
    let other_table = event("test_db", "items", EventType::Insert, row(&[]), None);
    let out = run(&mut c, &[deleted_order, other_table]);
    assert_eq!(out.matched, 0);
}

#[test]
fn teacher_consumer_processes_and_indexes_every_change() {
    let mut c = shipped_consumer("teacher_consumer");
    for table in ["derived_intl_teacher_data", "data_intl_wide_view"] {
        let data = row(&[
            ("id", Value::Int(3)),
            ("teacher_id", Value::Int(77)),
            ("country", Value::Text("PT".into())),
        ]);
        let e = event(
            "talent_platform",
            table,
            EventType::Update,
            data,
            Some(row(&[("country", Value::Text("ES".into()))])),
        );
        let out = run(&mut c, std::slice::from_ref(&e));
        assert_eq!(out.triggers.len(), 2, "{table}");
        let (p, i) = (&out.triggers[0], &out.triggers[1]);
        assert_eq!(p.plugin, "data_processor");
        assert_eq!(
            p.payload,
            json!({
                "operation": "process_teacher_data",
                "database": "talent_platform",
                "table": table,
                "event_type": "UPDATE",
                "primary_key": {"id": 3},
                "data": {"country": "PT", "id": 3, "teacher_id": 77},
                "old": {"country": "ES"},
                "changed": ["country"],
            })
        );
        assert_eq!(i.plugin, "es_indexer");
        assert_eq!(
            i.payload,
            json!({
                "operation": "index_document",
                "index": "teachers",
                "doc_id": 77,
                "action": "upsert",
                "source_table": table,
                "document": {"country": "PT", "id": 3, "teacher_id": 77},
            })
        );
        assert!(out.triggers.iter().all(|t| t.priority == Priority::Normal));
    }

    let profile = row(&[("id", Value::Int(77)), ("name", Value::Text("Ana".into()))]);
    let deleted = event(
        "talent_platform",
        "teacher_profiles",
        EventType::Delete,
        profile.clone(),
        None,
    );
    let out = run(&mut c, &[deleted]);
    assert_eq!(out.triggers.len(), 2);
    assert_eq!(out.triggers[0].payload["event_type"], "DELETE");
    assert_eq!(out.triggers[0].payload["old"], json!({}));
    assert_eq!(
        out.triggers[1].payload,
        json!({
            "operation": "index_document",
            "index": "teachers",
            "doc_id": 77,
            "action": "delete",
            "source_table": "teacher_profiles",
            "document": null,
        })
    );

    let inserted = event(
        "talent_platform",
        "teacher_profiles",
        EventType::Insert,
        profile,
        None,
    );
    let out = run(&mut c, &[inserted]);
    assert_eq!(out.triggers[1].payload["action"], "upsert");
    assert_eq!(out.triggers[1].payload["doc_id"], 77);

    // a row with neither teacher_id nor id cannot be indexed: error_handler gets it
    let mut broken = event(
        "talent_platform",
        "teacher_profiles",
        EventType::Insert,
        row(&[("name", Value::Text("x".into()))]),
        None,
    );
    broken.primary_keys.clear();
    let out = run(&mut c, &[broken]);
    let plugins: Vec<&str> = out.triggers.iter().map(|t| t.plugin.as_str()).collect();
    assert_eq!(plugins, ["data_processor", "error_handler"]);
    assert_eq!(out.triggers[1].payload["rule"], "index_teacher");
    assert_eq!(out.triggers[0].payload["primary_key"], json!({}));
}

#[test]
fn trigger_ids_are_deterministic() {
    let e = event(
        "test_db",
        "users",
        EventType::Insert,
        row(&[("id", Value::Int(7))]),
        None,
    );
    let a = run(
        &mut shipped_consumer("example_consumer"),
        std::slice::from_ref(&e),
    );
    let b = run(
        &mut shipped_consumer("example_consumer"),
        std::slice::from_ref(&e),
    );
    assert_eq!(a.triggers[0].id, b.triggers[0].id);
    assert_eq!(
        a.triggers[0].id,
        message_id(
            &SourceRef::from(&e),
            "example_consumer",
            Some("welcome_new_user"),
            "email_service",
            0
        )
    );
    let mut moved = e.clone();
    moved.position.row_index += 1;
    let c = run(&mut shipped_consumer("example_consumer"), &[moved]);
    assert_ne!(a.triggers[0].id, c.triggers[0].id);
}

// ---------------------------------------------------------------------------------------------
// test NAME and list helpers

#[test]
fn sample_events_exercise_every_filter() {
    for spec in shipped() {
        let events = sample_events(&spec);
        let per_filter: usize = spec.filters.iter().map(|f| f.event_types.len()).sum();
        assert_eq!(events.len(), per_filter, "{}", spec.name);
        let mut c = ConfigConsumer::new(spec.clone());
        let out = run_on_events(&mut c, &events);
        assert_eq!(out.matched, events.len());
        assert_eq!(out.stopped, None);
        assert!(
            out.triggers.iter().all(|t| t.plugin != "error_handler"),
            "{}: sample rows must satisfy the rules: {:?}",
            spec.name,
            out.triggers
        );
        // stable across runs
        assert_eq!(sample_events(&spec), events);
    }
    let example = shipped().remove(0);
    let out = run_on_events(
        &mut ConfigConsumer::new(example.clone()),
        &sample_events(&example),
    );
    let plugins: Vec<&str> = out.triggers.iter().map(|t| t.plugin.as_str()).collect();
    assert_eq!(plugins, ["email_service", "order_processor"]);
}

#[test]
fn describe_lists_filters_rules_and_plugins() {
    let specs = shipped();
    let d = describe(&specs[0]);
    assert_eq!(d.name, "example_consumer");
    assert!(d.enabled);
    assert_eq!(d.filters[0].events, ["INSERT", "UPDATE"]);
    assert_eq!(
        d.plugins,
        ["email_service", "order_processor", "error_handler"]
    );
    assert_eq!(d.rules[1].priority, "high");
    let text = d.to_string();
    assert!(
        text.contains("test_db.orders") && text.contains("order_processor"),
        "{text}"
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["rules"][0]["plugin"], "email_service");
    let table = describe_table(&specs.iter().map(describe).collect::<Vec<_>>());
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.starts_with("NAME"));
}

#[test]
fn direct_column_references_render_exactly_as_cel_does() {
    use super::expr::{self, Expression, Scope};
    let data = row(&[
        ("id", Value::Int(-7)),
        ("u", Value::UInt(u64::MAX)),
        ("f", Value::Float(1.5)),
        ("nan", Value::Float(f64::NAN)),
        ("t", Value::Text("héllo".into())),
        ("b", Value::Bytes(vec![0, 0xff, b'a'])),
        ("n", Value::Null),
        (
            "j",
            Value::Json(serde_json::json!({"z": [1, 2.5, "x"], "a": {"k": null}})),
        ),
        ("js", Value::Json(serde_json::json!("s"))),
    ]);
    let old = row(&[("t", Value::Text("before".into()))]);
    let e = event("db", "t", EventType::Update, data, Some(old));
    let root = expr::root_context();
    for col in ["id", "u", "f", "nan", "t", "b", "n", "j", "js"] {
        for src in [format!("data.{col}"), format!("data['{col}']")] {
            let direct = Expression::compile(&src).unwrap();
            let mut scope = Scope::new(&root, &e);
            let via_cel = direct.eval(scope.cel()).unwrap();
            assert_eq!(
                direct.json(&mut Scope::new(&root, &e)).unwrap(),
                expr::to_json(&via_cel).unwrap(),
                "{src}"
            );
            assert_eq!(
                direct.text(&mut Scope::new(&root, &e)).unwrap(),
                expr::to_text(&via_cel).unwrap(),
                "{src}"
            );
        }
    }
    let old_t = Expression::compile("old.t").unwrap();
    assert_eq!(
        old_t.json(&mut Scope::new(&root, &e)).unwrap(),
        serde_json::json!("before")
    );
    // a column the row lacks fails exactly as CEL fails it
    let missing = Expression::compile("data.missing").unwrap();
    let mut scope = Scope::new(&root, &e);
    let cel_err = missing.eval(scope.cel()).unwrap_err();
    assert_eq!(
        missing.json(&mut Scope::new(&root, &e)).unwrap_err(),
        cel_err
    );
    let old_missing = Expression::compile("old.id").unwrap();
    assert!(old_missing.json(&mut Scope::new(&root, &e)).is_err());
}

// ---------------------------------------------------------------------------------------------
// bulk rules (`batch = { max_rows, max_wait }`)

#[test]
fn bulk_settings_are_checked_and_errors_name_the_key() {
    let rule = |batch: &str| with_rule(&format!("name = \"r\"\nplugin = \"p\"\nbatch = {batch}"));
    let key = "consumers.c.rules[0].batch";
    expect_err(
        &rule("{ max_rows = 0 }"),
        &format!("{key}.max_rows"),
        "between 1 and 10000, got 0",
    );
    expect_err(
        &rule("{ max_rows = 10001 }"),
        &format!("{key}.max_rows"),
        "got 10001",
    );
    expect_err(
        &rule("{ max_rows = -3 }"),
        &format!("{key}.max_rows"),
        "got -3",
    );
    expect_err(
        &rule("{ max_rows = 5, max_wait = \"soon\" }"),
        &format!("{key}.max_wait"),
        "not a duration like \"50ms\"",
    );
    expect_err(
        &rule("{ max_rows = 5, max_wait = \"0s\" }"),
        &format!("{key}.max_wait"),
        "more than 0",
    );
    expect_err(&rule("{ max_wait = \"5ms\" }"), key, "max_rows");
    expect_err(
        &rule("{ max_rows = 5, size = 3 }"),
        &format!("{key}.size"),
        "unknown field `size`",
    );
    let c = one(&rule("{ max_rows = 500, max_wait = \"20ms\" }"));
    assert_eq!(
        c.spec().rules[0].batch,
        Some(BulkSpec {
            max_rows: 500,
            max_wait: std::time::Duration::from_millis(20)
        })
    );
    let c = one(&rule("{ max_rows = 2 }"));
    assert_eq!(
        c.spec().rules[0].batch.map(|b| b.max_wait),
        Some(BulkSpec::DEFAULT_MAX_WAIT)
    );
    // per-row is the default
    assert_eq!(
        one(&with_rule("name = \"r\"\nplugin = \"p\"")).spec().rules[0].batch,
        None
    );
}

/// INSERTs of ids `ids`, one binlog event each (offsets 100, 200, ...).
fn inserts(ids: &[i64]) -> Vec<ChangeEvent> {
    ids.iter()
        .enumerate()
        .map(|(n, &id)| {
            let mut e = event(
                "db",
                "t",
                EventType::Insert,
                row(&[("id", Value::Int(id)), ("v", Value::Text(format!("v{id}")))]),
                None,
            );
            e.position.offset = 100 * (n as u64 + 1);
            e.position.row_index = 0;
            e.executed_at += n as i64;
            e
        })
        .collect()
}

#[test]
fn bulk_rules_send_lists_of_the_row_payloads_max_rows_at_a_time() {
    let text = with_rule(
        "name = \"bulk\"\nplugin = \"p\"\npayload = { id = \"${data.id}\" }\n\
         when = { condition = \"data.id != 3\" }\nbatch = { max_rows = 2 }\n\
         [[consumers.c.rules]]\nname = \"each\"\nplugin = \"q\"\npayload = \"${data.id}\"",
    );
    let events = inserts(&[1, 2, 3, 4, 5, 6]);
    let out = run(&mut one(&text), &events);
    assert_eq!(out.stopped, None);
    // the per-row rule fires per row; the bulk rule's messages follow at the end of the part
    let per_row: Vec<_> = out.triggers.iter().filter(|t| t.plugin == "q").collect();
    assert_eq!(per_row.len(), 6);
    assert!(per_row.iter().all(|t| t.bulk.is_none()));
    let bulks: Vec<_> = out.triggers.iter().filter(|t| t.plugin == "p").collect();
    let payloads: Vec<_> = bulks.iter().map(|t| t.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            json!([{"id": 1}, {"id": 2}]),
            json!([{"id": 4}, {"id": 5}]),
            json!([{"id": 6}])
        ]
    );
    let ranges: Vec<_> = bulks
        .iter()
        .map(|t| {
            let b = t.bulk.as_ref().unwrap();
            (t.source.position.offset, b.last.offset, b.rows)
        })
        .collect();
    assert_eq!(ranges, vec![(100, 200, 2), (400, 500, 2), (600, 600, 1)]);
    // ids: the documented bulk scheme over the covered range, the same on every run
    let first = SourceRef::from(&events[3]);
    let last = SourceRef::from(&events[4]);
    assert_eq!(
        bulks[1].id,
        crate::trigger::bulk_message_id(&first, &last, 2, "c", "bulk", "p")
    );
    let again = run(&mut one(&text), &events);
    assert_eq!(
        again.triggers.iter().map(|t| &t.id).collect::<Vec<_>>(),
        out.triggers.iter().map(|t| &t.id).collect::<Vec<_>>()
    );
    // every row that matched is in exactly one bulk
    let ids: Vec<i64> = bulks
        .iter()
        .flat_map(|t| t.payload.as_array().unwrap().iter())
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 4, 5, 6]);
}

/// Two backfill reads whose rows came in one part (two high watermarks in one Canal batch):
/// each read is cut on its own, as it would be alone, so its bulks keep their ids.
#[test]
fn a_bulk_never_spans_two_backfill_reads() {
    let text = r#"
[consumers.c]
[[consumers.c.filters]]
database = "db"
table = "t"
events = ["SNAPSHOT"]

[[consumers.c.rules]]
name = "bulk"
plugin = "p"
payload = { id = "${data.id}" }
batch = { max_rows = 3 }
"#;
    // the rows of a read share its high watermark's position
    let snapshot = |id: i64, high: u64| {
        let mut e = event(
            "db",
            "t",
            EventType::Snapshot,
            row(&[("id", Value::Int(id))]),
            None,
        );
        e.position.offset = high;
        e.snapshot = Some(std::sync::Arc::new(crate::event::SnapshotOrigin {
            backfill: "b".into(),
            key: format!("[{id}]"),
            consumer: None,
        }));
        e
    };
    let cut = |events: &[ChangeEvent]| -> Vec<Vec<i64>> {
        run(&mut one(text), events)
            .triggers
            .iter()
            .map(|t| {
                t.payload
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["id"].as_i64().unwrap())
                    .collect()
            })
            .collect()
    };
    let a: Vec<ChangeEvent> = (1..=4).map(|id| snapshot(id, 100)).collect();
    let b: Vec<ChangeEvent> = (5..=8).map(|id| snapshot(id, 200)).collect();
    let both: Vec<ChangeEvent> = a.iter().chain(&b).cloned().collect();
    assert_eq!(
        cut(&both),
        vec![vec![1, 2, 3], vec![4], vec![5, 6, 7], vec![8]]
    );
    let alone: Vec<Vec<i64>> = [cut(&a), cut(&b)].concat();
    assert_eq!(cut(&both), alone, "the bulks each read makes alone");
    // and their ids
    let ids = |events: &[ChangeEvent]| -> Vec<String> {
        run(&mut one(text), events)
            .triggers
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    assert_eq!(ids(&both), [ids(&a), ids(&b)].concat());
}

#[test]
fn a_row_failing_in_a_bulk_rule_is_handled_alone_and_left_out_of_the_list() {
    let text = with_rule(
        "name = \"bulk\"\nplugin = \"p\"\npayload = { x = \"${data.x}\" }\nbatch = { max_rows = 10 }",
    );
    let mut events = inserts(&[1, 2, 3]);
    events[1].data.insert("x".into(), Value::Int(20));
    events[0].data.insert("x".into(), Value::Int(10));
    let out = run(&mut one(&text), &events);
    assert_eq!(out.stopped, None);
    let plugins: Vec<&str> = out.triggers.iter().map(|t| t.plugin.as_str()).collect();
    // row 3 has no `x`: error_handler for it, then one bulk with rows 1 and 2
    assert_eq!(plugins, vec!["error_handler", "p"]);
    assert_eq!(out.triggers[1].payload, json!([{"x": 10}, {"x": 20}]));
    assert_eq!(out.triggers[1].bulk.as_ref().unwrap().rows, 2);
}

#[test]
fn a_bulk_in_celery_args_mode_is_a_list_argument() {
    let text = with_rule(
        "name = \"bulk\"\nplugin = \"p\"\npayload = \"${data.id}\"\nbatch = { max_rows = 10 }\n\
         format = { kind = \"celery\", task = \"plugins.run\", mapping = \"args\" }",
    );
    let out = run(&mut one(&text), &inserts(&[7, 8]));
    let t = &out.triggers[0];
    let (args, kwargs) =
        crate::publisher::celery::call_arguments(t, crate::trigger::CeleryMapping::Args);
    assert_eq!(args, json!(["p", [7, 8]]));
    assert_eq!(kwargs, json!({}));
    let msg = crate::publisher::celery::encode(
        t,
        "plugins.run",
        crate::trigger::CeleryMapping::Args,
        "o",
    )
    .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&msg.body).unwrap();
    assert_eq!(body[0], json!(["p", [7, 8]]));
}
