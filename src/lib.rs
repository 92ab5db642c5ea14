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
//! the running service), [`backoff`] (the one exponential-backoff policy).

pub mod admin;
pub mod backfill;
pub mod backoff;
pub mod canal;
pub mod cli;
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
