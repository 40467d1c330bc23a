//! `e^x` of eight floats at once with AVX2 and FMA, for the attention kernels' softmax.
//!
//! The softmax of an attention row takes one exponential per key and query head: through the
//! C library's scalar `expf` that was about a sixth of an 8-stream decode step's attention on
//! the 2-core AMD EPYC. This is the Cephes single-precision method: `e^x = 2ⁿ · e^r` with
//! `n = round(x / ln 2)`, `r` reduced with a two-part `ln 2`, and `e^r` from a degree-6
//! polynomial. Its results are within a few units in the last place of the correctly rounded
//! value (the test bounds it against `f64::exp`).

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Below this, `e^x` is under f32's smallest normal number: the lanes are set to 0 (the
/// softmax's masked and far-below-maximum scores).
#[cfg(target_arch = "x86_64")]
const LOWEST: f32 = -87.336_54;
/// Above this the result would overflow; inputs are clamped to it (a softmax never gets
/// there: its arguments are at most 0).
#[cfg(target_arch = "x86_64")]
const HIGHEST: f32 = 88.0;

/// `e^x` in each lane: 0 below [`LOWEST`] (−∞ included), NaN where `x` is NaN.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp8(x: __m256) -> __m256 {
    // `min`/`max` return their second operand when either is NaN, so NaN passes through.
    let clamped = _mm256_max_ps(
        _mm256_set1_ps(LOWEST),
        _mm256_min_ps(_mm256_set1_ps(HIGHEST), x),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        clamped,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // r = x − n ln 2, with ln 2 split so that n × the first part is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), clamped);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // e^r ≈ 1 + r + r² p(r)
    let e_r = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    // 2ⁿ built in the exponent field (n is −126 ..= 127 after the clamp).
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOWEST));
    _mm256_andnot_ps(below, _mm256_mul_ps(e_r, two_n))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn exp_of(values: [f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: checked by the callers; eight floats in and out.
        unsafe {
            let v = exp8(_mm256_loadu_ps(values.as_ptr()));
            _mm256_storeu_ps(out.as_mut_ptr(), v);
        }
        out
    }

    fn supported() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[test]
    fn matches_the_exponential_within_a_few_ulp() {
        if !supported() {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        // Up to the clamp at 88 (the last lane of the last run is below it).
        while x < 87.99 {
            let lanes: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.001_37);
            for (v, got) in lanes.iter().zip(exp_of(lanes)) {
                let want = f64::from(*v).exp();
                worst = worst.max((f64::from(got) - want).abs() / want);
            }
            x += 0.0173;
        }
        // f32's unit in the last place is 2⁻²³ ≈ 1.19e-7 relative.
        assert!(worst < 3.0e-7, "relative error {worst}");
    }

    #[test]
    fn edges_are_exact() {
        if !supported() {
            return;
        }
        let got = exp_of([
            0.0,
            f32::NEG_INFINITY,
            -100.0,
            -87.4,
            f32::NAN,
            1.0,
            -1.0,
            88.0,
        ]);
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 0.0);
        assert_eq!(got[2], 0.0);
        assert_eq!(got[3], 0.0);
        assert!(got[4].is_nan());
        assert!((got[5] - std::f32::consts::E).abs() <= 4.0e-7);
        assert!((got[6] - 1.0 / std::f32::consts::E).abs() <= 1.0e-7);
        assert!(got[7].is_finite() && got[7] > 1.6e38);
    }
}
