//! Numbers in `config.json` that may be NaN or infinite (a held-out perplexity of ∞ is a
//! real result). JSON has no such numbers, and serde_json writes them as `null`, which
//! cannot be read back as a number: finite values are written as numbers, the others as
//! the strings `"NaN"`, `"inf"` and `"-inf"`; `null` (older files) reads as NaN.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Num {
    Finite(f64),
    Text(String),
    Null(()),
}

fn to_num(v: f64) -> Num {
    if v.is_finite() {
        Num::Finite(v)
    } else if v.is_nan() {
        Num::Text("NaN".into())
    } else if v > 0.0 {
        Num::Text("inf".into())
    } else {
        Num::Text("-inf".into())
    }
}

fn from_num<E: serde::de::Error>(n: Num) -> Result<f64, E> {
    match n {
        Num::Finite(v) => Ok(v),
        Num::Null(()) => Ok(f64::NAN),
        Num::Text(t) => match t.as_str() {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            other => Err(E::custom(format!("`{other}` is not a number"))),
        },
    }
}

/// `#[serde(with = "finite::f64")]`
pub mod f64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        to_num(*v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_num(Num::deserialize(d)?)
    }
}

/// `#[serde(with = "finite::vec_f32")]`: finite values keep their exact f32 text.
pub mod vec_f32 {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Num32 {
        Finite(f32),
        Other(Num),
    }

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let nums: Vec<Num32> = v
            .iter()
            .map(|&x| {
                if x.is_finite() {
                    Num32::Finite(x)
                } else {
                    Num32::Other(to_num(x as f64))
                }
            })
            .collect();
        nums.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Vec::<Num32>::deserialize(d)?
            .into_iter()
            .map(|n| match n {
                Num32::Finite(x) => Ok(x),
                Num32::Other(n) => from_num::<D::Error>(n).map(|x| x as f32),
            })
            .collect::<Result<_, _>>()
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct T {
        #[serde(with = "super::f64")]
        x: f64,
        #[serde(with = "super::vec_f32")]
        v: Vec<f32>,
    }

    #[test]
    fn non_finite_values_survive_a_round_trip() {
        let t = T {
            x: f64::INFINITY,
            v: vec![1.368, f32::NAN, f32::NEG_INFINITY, 0.1],
        };
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, r#"{"x":"inf","v":[1.368,"NaN","-inf",0.1]}"#);
        let back: T = serde_json::from_str(&s).unwrap();
        assert_eq!(back.x, f64::INFINITY);
        assert_eq!(back.v[0].to_bits(), 1.368f32.to_bits());
        assert!(back.v[1].is_nan() && back.v[2] == f32::NEG_INFINITY);
        let old: T = serde_json::from_str(r#"{"x":null,"v":[null]}"#).unwrap();
        assert!(old.x.is_nan() && old.v[0].is_nan());
        assert!(serde_json::from_str::<T>(r#"{"x":"lots","v":[]}"#).is_err());
    }
}
