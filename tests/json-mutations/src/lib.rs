//! Seeded random mutations of JSON documents: a valid request or resource broken at a random
//! place (a value replaced by an odd one, a field dropped, an unknown field added, a value
//! wrapped in an array), for tests that check that broken input is refused cleanly and never
//! crashes the server or the operator. The generator is deterministic, so a failing case can
//! be replayed from its seed and number.

use serde_json::{Value, json};

/// xorshift64*: deterministic, so a failing case can be replayed by its number.
pub struct Random(pub u64);

impl Random {
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }
}

/// A value that is wrong in some way for most fields.
pub fn odd_value(random: &mut Random) -> Value {
    match random.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1),
        5 => json!(2_147_483_648_i64),
        6 => json!(9_007_199_254_740_993_u64),
        7 => json!(-1e308),
        8 => json!(1e308),
        9 => json!(0.5),
        10 => json!(""),
        11 => json!("x".repeat(5_000)),
        12 => json!("\u{0}<|eot_id|>\u{fffd}"),
        13 => json!([]),
        14 => json!({}),
        15 => json!([[[]]]),
        16 => json!({"role": "user"}),
        17 => json!(["a", 1, null]),
        18 => json!("NaN"),
        19 => json!(-0.0),
        20 => json!(u64::MAX),
        _ => json!(i64::MIN),
    }
}

/// The paths of every value in `value`, objects' keys and arrays' indices.
fn paths(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                prefix.push(Step::Key(key.clone()));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(Step::Index(i));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn at<'a>(value: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(value, |v, step| match step {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// One mutation somewhere in `body`.
pub fn mutate(body: &mut Value, random: &mut Random) {
    let mut all = Vec::new();
    paths(body, &mut Vec::new(), &mut all);
    let path = all[random.below(all.len())].clone();
    match random.below(5) {
        // Replace the value.
        0..=2 => *at(body, &path) = odd_value(random),
        // Drop it from its object or array.
        3 => {
            if let Some((last, parent)) = path.split_last() {
                match (at(body, parent), last) {
                    (Value::Object(map), Step::Key(k)) => {
                        map.remove(k);
                    }
                    (Value::Array(items), Step::Index(i)) if *i < items.len() => {
                        items.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        // Add an unknown field beside it, or wrap it in an array.
        _ => match at(body, &path) {
            Value::Object(map) => {
                map.insert(format!("unknown_{}", random.below(100)), odd_value(random));
            }
            other => {
                let inner = other.take();
                *other = Value::Array(vec![inner]);
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_the_document_and_repeat_from_the_same_seed() {
        let valid = json!({"a": [1, {"b": "c"}], "d": {"e": null}});
        let run = |seed| {
            let mut random = Random(seed);
            (0..50)
                .map(|_| {
                    let mut doc = valid.clone();
                    mutate(&mut doc, &mut random);
                    doc
                })
                .collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(first, run(7), "the same seed, the same mutations");
        assert_ne!(first, run(8));
        let changed = first.iter().filter(|doc| **doc != valid).count();
        assert!(changed > 40, "only {changed} of 50 changed");
    }
}
