//! `config::load` against the real process environment and the default config file. The only
//! test in this binary, so changing the environment cannot disturb another test.

use canal_consumer::config::{CliOverrides, load};
use std::time::Duration;

#[test]
fn load_reads_the_process_environment_and_the_default_file() {
    // SAFETY: the only test in this process; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("CANAL_HOST", "env-host");
        std::env::set_var("CANAL_BATCH_SIZE", "64");
        std::env::set_var("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "10s");
        std::env::set_var("CANAL_CONSUMER__CANAL__PASSWORD", "12345");
    }
    // Tests run in the package root, where config/canal-consumer.toml (all defaults) exists.
    let c = load(
        None,
        CliOverrides {
            port: Some(12000),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.canal.host, "env-host");
    assert_eq!(c.canal.batch_size, 64);
    assert_eq!(c.canal.port, 12000);
    assert_eq!(c.amqp.confirm_timeout, Duration::from_secs(10));
    assert_eq!(c.canal.password.expose(), "12345");

    let shown = canal_consumer::config::check(None).unwrap();
    assert!(shown.contains("host = \"env-host\""), "{shown}");
    assert!(!shown.contains("12345"), "{shown}");

    unsafe { std::env::set_var("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED", "many") };
    let err = load(None, CliOverrides::default()).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED: key `amqp.max_unconfirmed`:"
        ),
        "{err}"
    );
}
