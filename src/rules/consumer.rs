//! [`ConfigConsumer`]: a [`Consumer`] driven by a [`ConsumerSpec`].

use super::expr;
use super::spec::{ConsumerSpec, OnError, RuleSpec};
use crate::consumer::{
    Consumer, ConsumerContext, ConsumerError, ErrorPolicy, Failure, TableFilter, TriggerRequest,
};
use crate::event::ChangeEvent;
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
pub struct ConfigConsumer {
    spec: ConsumerSpec,
    root: Context<'static, 'static>,
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
            spec,
            root: expr::root_context(),
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
        for rule in &self.spec.rules {
            if !rule.when.matches_names(event) {
                continue;
            }
            let outcome = Self::eval_rule(rule, &mut scope);
            match outcome {
                Ok(None) => {}
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
        Ok(())
    }
}
