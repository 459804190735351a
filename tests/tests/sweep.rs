//! The conversion sweep on a fixture: ten settings (0–100 % from the first and from the last layer), the 0 %
//! ones equal to the standard model, the 100 % ones equal to each other and to all-layer FarSkip, and the plot.

use burn::prelude::*;
use farskip_model::{Connectivity, Model};
use farskip_tests::*;
use farskip_train::data::ByteCorpus;
use farskip_train::evaluate;
use farskip_train::sweep::{SweepFrom, run_sweep, sweep_windows};

#[test]
fn sweep_covers_both_ends_and_matches_the_direct_evaluations() {
    let device = Device::flex();
    let model = Model::from_pretrained(fixture_dir("deepseek_v2"), &device).expect("load");
    let text = "It was the best of times, it was the worst of times. ".repeat(20);
    let windows = sweep_windows(ByteCorpus::from_text(&text).expect("text").tokens(), 32, 8)
        .expect("windows");
    let r = run_sweep(&model, &windows, &device).expect("sweep");
    let layers: Vec<(SweepFrom, usize, &str)> = r
        .settings
        .iter()
        .map(|s| (s.from, s.percent, s.layers.as_str()))
        .collect();
    assert_eq!(
        layers,
        [
            (SweepFrom::Start, 0, "none"),
            (SweepFrom::Start, 25, "0..=0"),
            (SweepFrom::Start, 50, "0..=1"),
            (SweepFrom::Start, 75, "0..=2"),
            (SweepFrom::Start, 100, "0..=3"),
            (SweepFrom::End, 0, "none"),
            (SweepFrom::End, 25, "3..=3"),
            (SweepFrom::End, 50, "2..=3"),
            (SweepFrom::End, 75, "1..=3"),
            (SweepFrom::End, 100, "0..=3"),
        ]
    );
    for s in r.settings.iter().filter(|s| s.percent == 0) {
        assert_eq!((s.agreement, s.kl), (1.0, 0.0), "{s:?}");
        assert_eq!(s.ppl, r.standard_ppl);
    }
    let farskip = model
        .clone()
        .with_connectivity(Connectivity::farskip())
        .expect("farskip");
    let direct = evaluate(&farskip, &windows, None, &device);
    for s in r.settings.iter().filter(|s| s.percent == 100) {
        assert!(
            (s.ppl - direct.ppl).abs() <= 1e-9 * direct.ppl,
            "{s:?} vs {direct:?}"
        );
        assert!(s.kl > 0.0 && s.agreement < 1.0, "{s:?}");
    }
    let svg = std::env::temp_dir().join(format!("farskip-sweep-{}.svg", std::process::id()));
    r.svg(&svg, "sweep").expect("svg");
    let drawn = std::fs::read_to_string(&svg).expect("read svg");
    assert!(drawn.contains("from the first layer") && drawn.contains("from the last layer"));
    let _ = std::fs::remove_file(svg);
}
