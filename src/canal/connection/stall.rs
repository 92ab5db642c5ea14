//! Reading a conflict out of Canal's answers: an ack for a batch that another process with
//! our client identity already acked or rolled back.

use crate::canal::CanalError;

/// Canal's answer when a batch we ack was already acked or rolled back by another process
/// with our client identity: `ack error , clientId:1001 batchId:7 is not exist`.
pub(super) fn vanished_batch(e: &CanalError) -> Option<String> {
    match e {
        CanalError::Server { message, .. }
            if message.contains("ack error") && message.contains("is not exist") =>
        {
            Some(format!(
                "a batch vanished before its ack (canal: {})",
                message
                    .rsplit("exception=")
                    .next()
                    .unwrap_or(message)
                    .trim()
            ))
        }
        _ => None,
    }
}
