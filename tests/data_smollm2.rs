//! Data preparation behaviour that depends on the default model's own chat template (SmolLM2's
//! template writes a default system message); the rest of data preparation is tested offline on
//! the tiny fixture in tests/data.rs.

mod common;

use afinar::data::{self, PrepareOptions, SplitFractions};
use common::{all_examples, conjugation_head, smollm2_text, write};

#[test]
fn a_default_system_message_replaces_the_templates_own() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.jsonl", conjugation_head(3).as_bytes());
    let with_own = br#"{"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#;
    let g = write(dir.path(), "b.jsonl", with_own);
    let mut o = PrepareOptions {
        data: vec![f, g],
        ..Default::default()
    };
    o.split = SplitFractions([1.0, 0.0, 0.0]);
    let default = all_examples(&data::prepare(&o, smollm2_text()).unwrap());
    o.system = Some("Conjugate.".into());
    let short = all_examples(&data::prepare(&o, smollm2_text()).unwrap());
    let tok = &smollm2_text().tokenizer;
    let texts: Vec<String> = short
        .iter()
        .map(|(ids, _)| tok.decode(ids, false).unwrap())
        .collect();
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.starts_with("<|im_start|>system\nConjugate.<|im_end|>"))
            .count(),
        3
    );
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.starts_with("<|im_start|>system\nMine.<|im_end|>"))
            .count(),
        1,
        "an example's own system message is kept"
    );
    let total = |v: &[(Vec<u32>, Vec<u8>)]| v.iter().map(|(i, _)| i.len()).sum::<usize>();
    assert!(
        total(&short) < total(&default),
        "a short system message makes examples shorter"
    );
}
