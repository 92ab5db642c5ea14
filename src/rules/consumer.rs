//! [`ConfigConsumer`]: a [`Consumer`] driven by a [`ConsumerSpec`].

use super::expr;
use super::spec::{ConsumerSpec, OnError, RuleSpec};
use crate::consumer::{
    Consumer, ConsumerContext, ConsumerError, ErrorPolicy, Failure, TableFilter, TriggerRequest,
};
use crate::event::{ChangeEvent, other_read};
use crate::trigger::SourceRef;
use cel::Context;

pub use crate::consumer::DEAD_LETTER_PLUGIN;

/// A consumer defined in a TOML file.
///
/// For each event it wants, every rule is tried in file order: the rule's database/table/event
/// checks, then its condition; a rule that fires renders its payload and triggers its plugin.
/// Rules are independent: one rule failing on a row (an unknown column, a type error) does not
/// stop the others; the failing rule's error policy applies to it alone (`error_handler` and
/// `dead_letter` emit one message for it; `stop` fails the whole event with
/// [`ConsumerError::Fatal`], so none of its triggers are published).
///
/// Bulk rules (`batch`) hold the payloads of the rows they fire on and send them as lists at
/// the end of the part ([`Consumer::end_of_part`]), `max_rows` per message: a bulk never spans
/// a Canal batch, so the ack rule holds unchanged. A row's payload joins only once its whole
/// event succeeded.
pub struct ConfigConsumer {
    spec: ConsumerSpec,
    root: Context<'static, 'static>,
    /// Per rule (bulk rules only): the rows of the current part waiting to go out as bulk
    /// messages, with their payloads.
    pending: Vec<Vec<(SourceRef, serde_json::Value)>>,
    /// The bulk payloads of the event being processed (rule index, payload): added to
    /// `pending` only once the whole event succeeded, so a failed event leaves nothing behind.
    staged: Vec<(usize, serde_json::Value)>,
}

impl std::fmt::Debug for ConfigConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigConsumer")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl ConfigConsumer {
    pub fn new(spec: ConsumerSpec) -> ConfigConsumer {
        ConfigConsumer {
            pending: vec![Vec::new(); spec.rules.len()],
            spec,
            root: expr::root_context(),
            staged: Vec::new(),
        }
    }

    pub fn spec(&self) -> &ConsumerSpec {
        &self.spec
    }

    /// Evaluates one rule: `Ok(None)` if its condition is false.
    fn eval_rule(
        rule: &RuleSpec,
        scope: &mut expr::Scope<'_, '_>,
    ) -> Result<Option<serde_json::Value>, String> {
        if let Some(cond) = &rule.when.condition {
            match cond.eval(scope.cel())? {
                cel::Value::Bool(true) => {}
                cel::Value::Bool(false) => return Ok(None),
                other => {
                    return Err(format!(
                        "condition `{}` gave a {}, not a bool",
                        cond.source,
                        other.type_of()
                    ));
                }
            }
        }
        rule.payload.render(scope).map(Some)
    }

    fn fail(
        &self,
        rule: &RuleSpec,
        event: &ChangeEvent,
        error: String,
        ctx: &mut ConsumerContext,
    ) -> Result<(), ConsumerError> {
        let error = format!("rule `{}`: {error}", rule.name);
        tracing::warn!(
            consumer = %self.spec.name,
            rule = %rule.name,
            table = %event.full_table(),
            position = %event.position,
            policy = rule.on_error.as_str(),
            error = %error,
            "rule failed on event"
        );
        let failure = Failure {
            consumer: &self.spec.name,
            rule: Some(&rule.name),
            event,
            error: &error,
            route: rule.route.clone().or_else(|| self.spec.route.clone()),
            format: rule.format.clone().or_else(|| self.spec.format.clone()),
        };
        if ctx.handle_failure(&self.policy(rule.on_error), failure) {
            Ok(())
        } else {
            Err(ConsumerError::Fatal(format!(
                "consumer `{}` {error} (policy stop)",
                self.spec.name
            )))
        }
    }

    /// An `on_error` setting as the policy it names (dead letters go to this consumer's route).
    fn policy(&self, on_error: OnError) -> ErrorPolicy {
        match on_error {
            OnError::ErrorHandler => ErrorPolicy::ErrorHandler,
            OnError::DeadLetter => ErrorPolicy::DeadLetter {
                route: self.spec.dead_letter_route.clone(),
            },
            OnError::Stop => ErrorPolicy::Stop,
        }
    }
}

impl Consumer for ConfigConsumer {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn filters(&self) -> &[TableFilter] {
        &self.spec.filters
    }

    fn error_policy(&self) -> ErrorPolicy {
        self.policy(self.spec.on_error)
    }

    fn process_event(
        &mut self,
        event: &ChangeEvent,
        ctx: &mut ConsumerContext,
    ) -> Result<(), ConsumerError> {
        // The CEL scope is built once per event, and only if an expression needs it (a
        // condition, or a payload expression that is more than a column of `data` or `old`).
        let mut scope = expr::Scope::new(&self.root, event);
        let mut staged = std::mem::take(&mut self.staged);
        staged.clear();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            if !rule.when.matches_names(event) {
                continue;
            }
            let outcome = Self::eval_rule(rule, &mut scope);
            match outcome {
                Ok(None) => {}
                Ok(Some(payload)) if rule.batch.is_some() => staged.push((i, payload)),
                Ok(Some(payload)) => {
                    ctx.trigger(TriggerRequest {
                        plugin: rule.plugin.clone(),
                        payload,
                        priority: rule.priority,
                        rule: Some(rule.name.clone()),
                        route: rule.route.clone().or_else(|| self.spec.route.clone()),
                        format: rule.format.clone().or_else(|| self.spec.format.clone()),
                    });
                }
                Err(error) => self.fail(rule, event, error, ctx)?,
            }
        }
        if !staged.is_empty() {
            let source = SourceRef::from(event);
            for (i, payload) in staged.drain(..) {
                self.pending[i].push((source.clone(), payload));
            }
        }
        self.staged = staged;
        Ok(())
    }

    /// Sends the part's bulk messages: per bulk rule, its rows in order, `max_rows` per
    /// message, and SNAPSHOT rows of one backfill read per message ([`other_read`]). A bulk
    /// therefore never spans a Canal batch, nor two reads whose rows came in one batch: a
    /// read's bulks are the same whether its rows came alone or with another's.
    fn end_of_part(&mut self, ctx: &mut ConsumerContext) -> Result<(), ConsumerError> {
        self.staged.clear();
        for (rule, pending) in self.spec.rules.iter().zip(self.pending.iter_mut()) {
            let Some(bulk) = rule.batch else {
                continue;
            };
            let mut rows = std::mem::take(pending).into_iter().peekable();
            while rows.peek().is_some() {
                let mut first = None;
                let mut last = None;
                let mut payloads = Vec::with_capacity(bulk.max_rows);
                let mut positions = Vec::with_capacity(bulk.max_rows);
                while positions.len() < bulk.max_rows {
                    let Some((source, payload)) = rows.next_if(|(s, _)| {
                        !first
                            .as_ref()
                            .is_some_and(|f: &SourceRef| other_read(f.read(), s.read()))
                    }) else {
                        break;
                    };
                    positions.push(source.position.clone());
                    if first.is_none() {
                        first = Some(source);
                    } else {
                        last = Some(source);
                    }
                    payloads.push(payload);
                }
                let Some(first) = first else { break };
                let last = last.unwrap_or_else(|| first.clone());
                ctx.trigger_bulk(
                    TriggerRequest {
                        plugin: rule.plugin.clone(),
                        payload: serde_json::Value::Array(payloads),
                        priority: rule.priority,
                        rule: Some(rule.name.clone()),
                        route: rule.route.clone().or_else(|| self.spec.route.clone()),
                        format: rule.format.clone().or_else(|| self.spec.format.clone()),
                    },
                    first,
                    &last,
                    positions,
                );
            }
        }
        Ok(())
    }
}
