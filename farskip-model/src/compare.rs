//! The one max-|Δ| comparison of tests and reports. It cannot be fooled: a NaN or an infinity on either side, or
//! inputs of different lengths or shapes, give `f64::INFINITY`, so `diff <= tolerance` never passes on them
//! (`fold(0.0, f64::max)` reads a NaN as 0).

use burn::prelude::*;

/// Max |a − b| over two slices; `f64::INFINITY` when the lengths differ or any difference is not finite.
pub fn max_abs_diff<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut max = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x.into() - y.into()).abs();
        if !d.is_finite() {
            return f64::INFINITY;
        }
        max = max.max(d);
    }
    max
}

/// [`max_abs_diff`] of two tensors (one host read each); `f64::INFINITY` when their shapes differ.
pub fn max_abs_diff_tensors<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    if a.dims() != b.dims() {
        return f64::INFINITY;
    }
    let host = |t: Tensor<D>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default()
    };
    max_abs_diff(&host(a), &host(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_inf_and_length_mismatch_never_pass() {
        assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.0, 2.5]), 0.5);
        assert_eq!(max_abs_diff::<f32>(&[], &[]), 0.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(max_abs_diff(&[1.0f32, bad], &[1.0, 2.0]), f64::INFINITY);
            assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.0, bad]), f64::INFINITY);
        }
        assert_eq!(max_abs_diff(&[1.0f64], &[1.0, 2.0]), f64::INFINITY);
        let d = Device::flex();
        let a = Tensor::<2>::from_floats([[1.0, 2.0]], &d);
        let nan = Tensor::<2>::from_floats([[1.0, f32::NAN]], &d);
        let col = Tensor::<2>::from_floats([[1.0], [2.0]], &d);
        assert_eq!(max_abs_diff_tensors(a.clone(), a.clone()), 0.0);
        assert_eq!(max_abs_diff_tensors(a.clone(), nan), f64::INFINITY);
        assert_eq!(max_abs_diff_tensors(a, col), f64::INFINITY);
    }
}
