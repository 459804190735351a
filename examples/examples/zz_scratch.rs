//! scratch timing (temporary)
use burn::prelude::*;
use burn::tensor::Distribution;
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
    let r = |s: [usize; 2]| Tensor::<2>::random(s, Distribution::Normal(0., 1.), &d);
    let r3 = |s: [usize; 3]| Tensor::<3>::random(s, Distribution::Normal(0., 1.), &d);
    let w2 = r([512, 1024]);
    let xe = r([64, 512]);
    t("A mm 64x512x1024 hot x16", 9, || {
        for _ in 0..16 {
            let _ = xe.clone().matmul(w2.clone());
        }
    });
    let ws: Vec<_> = (0..16).map(|_| r([512, 1024])).collect();
    t("B mm 64x512x1024 16 distinct w", 9, || {
        for w in &ws {
            let _ = xe.clone().matmul(w.clone());
        }
    });
    let gu = r3([16, 512, 1024]);
    t("B2 narrow of gu", 9, || {
        for e in 0..16 {
            let _ = xe
                .clone()
                .matmul(gu.clone().narrow(0, e, 1).squeeze_dim::<2>(0));
        }
    });
    let xp = r3([16, 64, 512]);
    t("C bmm [16,64,512]x[16,512,1024]", 9, || {
        xp.clone().matmul(gu.clone())
    });
    let gut = r3([16, 1024, 512]);
    t("D bmm rhs transposed view", 9, || {
        xp.clone().matmul(gut.clone().swap_dims(1, 2))
    });
    let x2 = r3([4, 64, 512]);
    let g4 = r3([4, 512, 1024]);
    t("E bmm batch 4", 9, || x2.clone().matmul(g4.clone()));
    let xr = r([128, 512]);
    t("F mm 128x512x1024 16 distinct", 9, || {
        for w in &ws {
            let _ = xr.clone().matmul(w.clone());
        }
    });
    let big: Vec<f32> = vec![1.0; 64 << 20];
    t("G memcpy 256MB", 5, || big.clone());
    let xl = r([1024, 512]);
    t("H mm 1024x512x1024", 9, || xl.clone().matmul(w2.clone()));
}
