//! scratch (temporary)
use burn::prelude::*;
use burn::tensor::Distribution;
use farskip_examples::load_model;
use std::time::Instant;
fn t<R>(name: &str, n: usize, mut f: impl FnMut() -> R) {
    for _ in 0..2 {
        let _ = f();
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            let _ = f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    eprintln!("{name:<40} {:8.2} ms (min {:.2})", v[n / 2], v[0]);
}
fn main() {
    let d = Device::default();
    let model = load_model(None, Some("small"), &d).unwrap();
    let layer = &model.layers[0];
    let x = Tensor::<3>::random([1, 512, 512], Distribution::Normal(0., 1.), &d);
    let a = &layer.attention;
    t("attention.forward", 9, || {
        a.forward(x.clone(), 0, None).into_data()
    });
    t("project", 9, || {
        let p = a.project(x.clone(), 0, None);
        (p.q.into_data(), p.k.into_data())
    });
    let p = a.project(x.clone(), 0, None);
    t("attend", 9, || a.attend(p.clone()).into_data());
    t("input_norm", 9, || {
        layer.input_norm.forward(x.clone()).into_data()
    });
    let w = Tensor::<2>::random([512, 512], Distribution::Normal(0., 1.), &d);
    t("x @ w 512", 9, || {
        x.clone().matmul(w.clone().unsqueeze::<3>()).into_data()
    });
    let x2 = x.clone().reshape([512, 512]);
    t("x2 @ w 512 (2d)", 9, || {
        x2.clone().matmul(w.clone()).into_data()
    });
    let q = p.q.clone();
    let k = p.k.clone();
    let v = p.v.clone();
    t("fused attn", 9, || {
        burn::tensor::module::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            None,
            None,
            burn::tensor::ops::AttentionModuleOptions {
                scale: Some(0.125),
                softcap: None,
                is_causal: true,
            },
        )
        .into_data()
    });
}
