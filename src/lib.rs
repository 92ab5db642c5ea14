//! canal-consumer: MySQL row changes from Alibaba Canal, routed to consumers, turned into plugin
//! tasks on RabbitMQ, with nothing lost.
//!
//! The pipeline, and the module that owns each stage:
//!
//! ```text
//! MySQL binlog -> Canal server -(TCP)-> canal::connection (CanalConnection actor)
//!     -> manager (Manager actor: routing, batch tracking, ordered acks)
//!     -> consumer (one supervised actor per consumer; rules for config-driven ones)
//!     -> publisher (AMQP publisher actor: confirms, returns, back-pressure)
//!     -> RabbitMQ queue `plugin_tasks` -> plugin workers (e.g. Celery)
//! ```
//!
//! - [`canal`]: the Canal protocol: codec, session, connection actor, entry decoding.
//! - [`event`]: the [`event::ChangeEvent`] model consumers see.
//! - [`consumer`]: the [`consumer::Consumer`] trait, filters and the trigger context.
//! - [`trigger`]: what a consumer emits: [`trigger::Trigger`], priorities, message ids.
//! - [`publisher`]: where triggers go.
//! - [`rules`]: consumers defined in TOML (filters, CEL conditions, payload templates).
//! - [`manager`]: the Manager actor (routing, batch tracking, acks).
//!
//! Operating it: [`config`] (layered loading, validation), [`logging`], [`metrics`] (the shared
//! Prometheus registry), [`state`] (persisted enable/disable), [`admin`] (the admin HTTP
//! endpoint, its access rules and its command-line client), [`tap`] (what `tail` reads from
//! the running service), [`backoff`] (the one exponential-backoff policy), [`clock`] (the wall
//! clock, and how times and durations are written).
//!
//! # Errors
//!
//! A failure that crosses an actor edge is an error type, not a `String`, and the type says
//! whether it is *transient* or *definite*:
//! - transient: the same request may succeed later (the broker, the link, the source database
//!   or a consumer instance was the problem); whoever holds the work retries it with backoff,
//!   and nothing is acked meanwhile;
//! - definite: repeating it as it is fails the same way (a wrong setting or password, a
//!   message that cannot be routed as configured, a command that does not fit the state); an
//!   operator, or a policy such as `on_poison`, decides how to go on.
//!
//! A type whose every variant is of one kind says so in its docs
//! ([`consumer::ProcessFailure`] is transient, [`canal::connection::SkipError`] definite). A
//! type with both kinds answers `is_transient()`, the one classifier name:
//! [`publisher::PublishError`], [`manager::core::PartError`], [`canal::CanalError`],
//! [`canal::source::SourceError`], [`backfill::BackfillError`]. The connection core's
//! [`canal::connection::FailureKind`] refines it with the definite cases the core handles on
//! its own (an oversized frame, a conflict, a lost lease). Text is only for people: what log
//! lines, `status` fields and command output show is the error's `Display`, and a rollback or
//! an epoch reset carries its reason as text for the log, since nothing decides on it.

pub mod admin;
pub mod backfill;
pub mod backoff;
pub mod canal;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod event;
pub mod ha;
pub mod instance;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod publisher;
pub mod rules;
pub mod secret;
pub mod service;
pub mod state;
pub mod tap;
pub mod trigger;
