//! What each instance's engine serves: the context window and the key/value cache budget, from
//! `spec.engine`, the model catalog and the instance type's GPU memory. Pure.

use crate::api::{EngineSpec, WeightType};
use crate::catalog::{InstanceType, ModelInfo};
use crate::validate::SpecError;

/// The share of an instance's GPU memory that weights and key/value cache may take together;
/// the rest is left to activations, the CUDA context and fragmentation (vLLM's default
/// `gpu_memory_utilization` is the same 0.9).
pub const GPU_MEMORY_FRACTION: f64 = 0.9;

/// The server's own default budget: four context windows, at least this many tokens.
const DEFAULT_MIN_KV_TOKENS: u64 = 65_536;

const GIB: f64 = (1u64 << 30) as f64;

/// The engine limits decided for each instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingPlan {
    /// The context window served, in tokens.
    pub context_length: u64,
    /// The key/value cache budget in tokens; `None` leaves the server's default.
    pub kv_cache_tokens: Option<u64>,
    /// GPU memory of a full budget, in GiB, where the catalog gives the size per token.
    pub kv_cache_gib: Option<f64>,
}

/// Decides the context window and cache budget, or says which field to change. `model`'s
/// weights are of `weight_type` (see `ModelInfo::with_weights`).
pub fn plan_serving(
    engine: &EngineSpec,
    model: &ModelInfo,
    instance: &InstanceType,
    weight_type: WeightType,
) -> Result<ServingPlan, SpecError> {
    let model_context = u64::from(model.context_length);
    let asked_context = engine.context_length.map(clamp_u64);
    if let Some(asked) = asked_context
        && asked > model_context
    {
        return Err(SpecError::ContextLengthTooLong {
            model: model.name.to_string(),
            value: asked,
            max: model_context,
        });
    }
    let context = asked_context.unwrap_or(model_context);
    let asked_budget = engine.kv_cache_tokens.map(clamp_u64);

    let Some(per_token_16) = model.kv_bytes_per_token.filter(|b| *b > 0) else {
        // Nothing to size with: the server's default stands unless the spec names a budget.
        return Ok(ServingPlan {
            context_length: asked_budget.map_or(context, |b| context.min(b)),
            kv_cache_tokens: asked_budget,
            kv_cache_gib: None,
        });
    };
    let per_token = per_token_16.saturating_mul(engine.kv_cache_dtype.width_factor());
    let weights_gib = model.weights_gib();
    let total_gib = f64::from(instance.total_gpu_memory_gib());
    let free_gib = (total_gib * GPU_MEMORY_FRACTION - weights_gib).max(0.0);
    let fits = (free_gib * GIB / per_token as f64).floor() as u64;
    let gib_of = |tokens: u64| tokens as f64 * per_token as f64 / GIB;
    let too_big = |field: &'static str, value: u64| SpecError::KvCacheDoesNotFit {
        field,
        value,
        needed_gib: round2(gib_of(value)),
        fits,
        free_gib: round2(free_gib),
        instance: instance.name.clone(),
        dtype: engine.kv_cache_dtype,
        weights_gib: round2(weights_gib),
        weight_type,
    };

    let budget = match asked_budget {
        Some(asked) if asked > fits => return Err(too_big("spec.engine.kvCacheTokens", asked)),
        Some(asked) => asked,
        None => {
            let default = context.saturating_mul(4).max(DEFAULT_MIN_KV_TOKENS);
            let budget = default.min(fits);
            if asked_context.is_some_and(|c| c > budget) || budget < 2 {
                return Err(too_big("spec.engine.contextLength", context));
            }
            budget
        }
    };
    Ok(ServingPlan {
        // A budget below the model's window caps the window: no request could fill more.
        context_length: context.min(budget),
        kv_cache_tokens: Some(budget),
        kv_cache_gib: Some(round2(gib_of(budget))),
    })
}

fn clamp_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ModelName;
    use crate::catalog::{default_instance_types, default_models};

    fn model(name: ModelName) -> ModelInfo {
        default_models()
            .into_iter()
            .find(|m| m.name == name)
            .expect("catalog model")
    }

    fn instance(name: &str) -> InstanceType {
        default_instance_types()
            .into_iter()
            .find(|t| t.name == name)
            .expect("catalog instance type")
    }

    fn engine(yaml: &str) -> EngineSpec {
        serde_yaml::from_str(yaml).expect("engine spec")
    }

    const A100: &str = "Standard_NC24ads_A100_v4";

    #[test]
    fn the_default_budget_is_four_windows_when_they_fit() {
        // 1B: 32 KiB a token; 4 × 131072 tokens = 16 GiB, beside 2.3 GiB of weights in 72 GiB.
        let plan = plan_serving(
            &engine("{}"),
            &model(ModelName::Llama32_1B),
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        assert_eq!(plan.context_length, 131_072);
        assert_eq!(plan.kv_cache_tokens, Some(4 * 131_072));
        assert_eq!(plan.kv_cache_gib, Some(16.0));
    }

    #[test]
    fn the_default_budget_shrinks_to_what_fits_beside_the_weights() {
        // 8B on one A100 80 GB: 72 GiB usable − 14.96 GiB of weights = 57.04 GiB, at 128 KiB a
        // token = 467,271 tokens (four windows would be 524,288 = 64 GiB).
        let plan = plan_serving(
            &engine("{}"),
            &model(ModelName::Llama31_8BInstruct),
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        let free = 80.0 * 0.9 - 8.03 * 2.0 * 1e9 / GIB;
        let fits = (free * GIB / 131_072.0).floor() as u64;
        assert_eq!(plan.kv_cache_tokens, Some(fits));
        assert!((460_000..470_000).contains(&fits), "{fits}");
        assert_eq!(plan.context_length, 131_072);
        // f32 doubles each token's size, so half as many fit.
        let plan = plan_serving(
            &engine("{kvCacheDtype: f32}"),
            &model(ModelName::Llama31_8BInstruct),
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        assert_eq!(
            plan.kv_cache_tokens,
            Some((free * GIB / 262_144.0).floor() as u64)
        );
    }

    #[test]
    fn a_smaller_window_makes_a_smaller_default_and_a_budget_caps_the_window() {
        let m = model(ModelName::Llama31_8BInstruct);
        let plan = plan_serving(
            &engine("{contextLength: 8192}"),
            &m,
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        assert_eq!(plan.context_length, 8192);
        assert_eq!(plan.kv_cache_tokens, Some(65_536));
        assert_eq!(plan.kv_cache_gib, Some(8.0));
        let plan = plan_serving(
            &engine("{kvCacheTokens: 20000}"),
            &m,
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        assert_eq!(plan.kv_cache_tokens, Some(20_000));
        assert_eq!(plan.context_length, 20_000);
    }

    #[test]
    fn a_budget_that_does_not_fit_names_the_field_and_the_most_that_fits() {
        let err = plan_serving(
            &engine("{kvCacheTokens: 1000000}"),
            &model(ModelName::Llama31_8BInstruct),
            &instance(A100),
            WeightType::Bf16,
        )
        .expect_err("does not fit");
        let text = err.to_string();
        assert_eq!(err.reason(), "KvCacheDoesNotFit");
        assert!(
            text.starts_with("spec.engine.kvCacheTokens: 1000000 tokens"),
            "{text}"
        );
        assert!(text.contains("122.07 GiB"), "{text}");
        assert!(text.contains("at most 467"), "{text}");
        assert!(text.contains(A100), "{text}");
        assert!(text.contains("less 14.96 GiB of BF16 weights"), "{text}");
    }

    #[test]
    fn quantized_weights_leave_more_room_for_the_cache() {
        // 70B at Q4_K_M on one A100 80 GB: 72 GiB usable − 43.56 GiB of weights = 28.44 GiB,
        // at 320 KiB a token (80 layers) = 93,191 tokens: the default budget, and the window
        // it caps. 16-bit weights (131.5 GiB) would not fit at all.
        let m = model(ModelName::Llama31_70BInstruct).with_weights(WeightType::Q4KM, 80);
        let plan =
            plan_serving(&engine("{}"), &m, &instance(A100), WeightType::Q4KM).expect("plan");
        let free = 80.0 * 0.9 - 70.6 * 5.3 / 8.0 * 1e9 / GIB;
        let fits = (free * GIB / 327_680.0).floor() as u64;
        assert_eq!(plan.kv_cache_tokens, Some(fits));
        assert!((93_000..93_300).contains(&fits), "{fits}");
        assert_eq!(plan.context_length, fits);
        let err = plan_serving(
            &engine("{kvCacheTokens: 200000}"),
            &m,
            &instance(A100),
            WeightType::Q4KM,
        )
        .expect_err("does not fit");
        assert!(
            err.to_string().contains("less 43.56 GiB of Q4_K_M weights"),
            "{err}"
        );
    }

    #[test]
    fn a_window_the_memory_cannot_hold_names_the_window() {
        // A configured model with 1 MiB a token: the 57 GiB beside the weights hold 58,409
        // tokens, fewer than the window asked for.
        let mut m = model(ModelName::Llama31_8BInstruct);
        m.kv_bytes_per_token = Some(1 << 20);
        let err = plan_serving(
            &engine("{contextLength: 100000}"),
            &m,
            &instance(A100),
            WeightType::Bf16,
        )
        .expect_err("does not fit");
        assert_eq!(err.reason(), "KvCacheDoesNotFit");
        assert!(
            err.to_string()
                .starts_with("spec.engine.contextLength: 100000 tokens"),
            "{err}"
        );
    }

    #[test]
    fn a_window_beyond_the_models_is_refused() {
        let err = plan_serving(
            &engine("{contextLength: 200000}"),
            &model(ModelName::Llama32_1B),
            &instance(A100),
            WeightType::Bf16,
        )
        .expect_err("too long");
        assert_eq!(err.reason(), "ContextLengthTooLong");
        assert!(err.to_string().contains("at most 131072"), "{err}");
    }

    #[test]
    fn without_a_size_per_token_the_servers_default_stands() {
        let mut m = model(ModelName::Llama32_1B);
        m.kv_bytes_per_token = None;
        let plan =
            plan_serving(&engine("{}"), &m, &instance(A100), WeightType::Bf16).expect("plan");
        assert_eq!(plan.kv_cache_tokens, None);
        assert_eq!(plan.context_length, 131_072);
        let plan = plan_serving(
            &engine("{kvCacheTokens: 5000}"),
            &m,
            &instance(A100),
            WeightType::Bf16,
        )
        .expect("plan");
        assert_eq!(plan.kv_cache_tokens, Some(5000));
        assert_eq!(plan.context_length, 5000);
        assert_eq!(plan.kv_cache_gib, None);
    }
}
