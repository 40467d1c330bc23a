//! Folding the eight lanes of an AVX register into one float, for the kernels that keep eight
//! partial sums (or maxima) and need their total at the end.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// The sum of the eight lanes of `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn lane_sum(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The largest of the eight lanes of `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn lane_max(x: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_every_lane() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let v = [3.0f32, -1.0, 7.5, 0.25, -8.0, 2.0, 7.25, 1.0];
        // SAFETY: AVX2 and FMA were detected; `v` is eight floats.
        let (sum, max) = unsafe {
            let x = _mm256_loadu_ps(v.as_ptr());
            (lane_sum(x), lane_max(x))
        };
        assert_eq!(sum, v.iter().sum::<f32>());
        assert_eq!(max, 7.5);
        // The maximum in each lane in turn.
        for i in 0..8 {
            let mut w = [0f32; 8];
            w[i] = 1.0;
            // SAFETY: as above.
            let max = unsafe { lane_max(_mm256_loadu_ps(w.as_ptr())) };
            assert_eq!(max, 1.0, "lane {i}");
        }
    }
}
