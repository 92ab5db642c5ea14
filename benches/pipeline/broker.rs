//! The broker the bench talks to and the queue it measures: the single node of `deploy/local/up`
//! or, with `BENCH_CLUSTER=1`, the three-node cluster and a quorum queue; the queue's
//! arguments and message priorities, for the service and the probes alike.

use crate::env::amqp_cluster_urls;
use lapin::types::FieldTable;

/// `BENCH_CLUSTER=1`: the three-node cluster of `deploy/local/rabbit-cluster-ctl` and a quorum
/// queue (README "RabbitMQ cluster" topology) instead of the single node and a classic queue;
/// the run ends after the throughput phase with RabbitMQ PerfTest's confirmed-publish rate to
/// the same kind of queue (`deploy/local/perftest`).
pub(crate) fn cluster() -> bool {
    std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1")
}

/// The broker the bench itself talks to: the single node (`CC_TEST_AMQP_URL`), or the
/// cluster's first node (`CC_TEST_AMQP_CLUSTER_URLS`).
pub(crate) fn amqp_url() -> String {
    if cluster() {
        amqp_cluster_urls()[0].clone()
    } else {
        crate::env::amqp_url()
    }
}

/// The quorum queue settings of the cluster mode, for the service and the probes alike.
pub(crate) fn quorum_queue() -> canal_consumer::config::QueueConfig {
    canal_consumer::config::QueueConfig {
        name: QUEUE.into(),
        max_priority: None,
        queue_type: canal_consumer::config::QueueType::Quorum,
        dead_letter_exchange: format!("{QUEUE}.dlx"),
        dead_letter_strategy: canal_consumer::config::DeadLetterStrategy::AtLeastOnce,
        delivery_limit: Some(5),
        ..Default::default()
    }
}

pub(crate) const QUEUE: &str = "cc_bench";

/// A consumer of `queue` under `tag` that takes deliveries without acks (the bench's sinks).
pub(crate) async fn no_ack_consumer(
    ch: &lapin::Channel,
    queue: &str,
    tag: &str,
) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        lapin::options::BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
}

pub(crate) fn queue_args(max_priority: Option<u8>) -> FieldTable {
    if cluster() {
        return canal_consumer::publisher::topology::declare_arguments(&quorum_queue());
    }
    let mut q = canal_consumer::config::Config::default().amqp.queue;
    q.max_priority = max_priority;
    canal_consumer::publisher::topology::declare_arguments(&q)
}

/// The `normal` message priority the bench uses in a queue with `levels` priorities.
pub(crate) fn normal_priority(levels: u8) -> u8 {
    levels.div_ceil(2).min(5)
}
