//! AdamW with its state in the open (so checkpoints can save and restore it exactly),
//! gradient clipping by global norm, and the learning-rate schedule (linear warm-up, then
//! cosine decay to a floor).

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

pub struct AdamW {
    /// Sorted by name, so the update order (and its rounding) never changes.
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far.
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: &VarMap, weight_decay: f64) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            m: zeros.clone(),
            v: zeros,
            vars,
            t: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with learning rate `lr`. Weight decay applies to matrices only (not to
    /// biases and norm gains).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.eps)?)?;
            let decay = if var.rank() >= 2 {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let next = ((var.as_tensor() * decay)? - (update * lr)?)?;
            var.set(&next)?;
        }
        Ok(())
    }

    /// The moments by parameter name (`m.NAME`, `v.NAME`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{which}.{name}");
                let Some(x) = state.get(&key) else {
                    bail!(
                        "optimizer state has no `{key}`: the checkpoint belongs to another model"
                    );
                };
                if x.dims() != var.dims() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        x.dims(),
                        var.dims()
                    );
                }
                *slot = x.clone();
            }
        }
        self.t = t;
        Ok(())
    }

    /// The first parameter (by name) holding a NaN or an infinity: a diverged run.
    pub fn non_finite(&self) -> Result<Option<&str>> {
        for (name, var) in &self.vars {
            let v = var.flatten_all()?.to_vec1::<f32>()?;
            if !v.iter().all(|x| x.is_finite()) {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter().map(|(_, v)| v)
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * s)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Linear warm-up over `warmup` steps to `peak`, then cosine decay to `peak · floor` at `total`.
pub fn lr_at(step: u64, warmup: u64, total: u64, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 10, 100, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        use candle_core::Device;
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[2f32], &Device::Cpu).unwrap();
        let loss = ((a.as_tensor() * 3.0).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let mut g = loss.backward().unwrap();
        // Gradients (3, 3) and (4): norm sqrt(9 + 9 + 16) = sqrt(34).
        let vars = [a.clone(), b.clone()];
        let n = clip(&mut g, &vars, 1.0).unwrap();
        assert!((n - 34f64.sqrt()).abs() < 1e-6);
        let after = clip(&mut g, &vars, 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-6);
    }
}
