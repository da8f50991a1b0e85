//! The peaks `bench` measures its figures against, on the spot and with the same threads
//! (docs/design.md section 5): the FMA limit of each instruction set the CPU has (a loop of
//! independent FMAs on registers only, no memory traffic), the `vdpbf16ps` limit for bf16,
//! and where the CPU has AMX the `tdpbf16ps` limit (four independent tile products on
//! tiles loaded once); plus what the CPU is and which code path the kernels take. A fraction of one of
//! these above 100% means the peak is wrong, not the kernel fast.
//!
//! Each loop keeps 12–16 accumulators in registers: enough to cover an FMA's latency (4–5
//! cycles) times the vector FMA ports (2) of current x86 cores, so the loop runs at the
//! ports' throughput. It runs on every thread of rayon's pool at once (`broadcast`), and the
//! figure is the FLOPs of all threads over the wall time of the slowest (best of five).

use std::time::Instant;

use maskattn::{AmxMode, Isa};

/// FLOP/s figures in GFLOP/s; `None` where the CPU lacks the instructions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peaks {
    pub threads: usize,
    pub fma_avx512: Option<f64>,
    pub fma_avx2: Option<f64>,
    /// `vdpbf16ps` (AVX512-BF16): 16 lanes × 2 bf16 products, each a multiply and an add.
    pub bf16_dot: Option<f64>,
    /// `tdpbf16ps` (AMX-BF16): 4 tile products of 16 × 16 × 32, 16384 FLOPs each.
    pub amx: Option<f64>,
}

/// What the CPU is and which path the kernels take on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Paths {
    pub cpu: String,
    /// `maskattn::current_isa()`.
    #[serde(serialize_with = "debug_name")]
    pub isa: Isa,
    /// Whether bf16 storage goes to `vdpbf16ps` (else it is widened to f32).
    pub bf16_dot: bool,
    /// CPUID leaf 7: AMX-TILE and AMX-BF16.
    pub amx_tile: bool,
    pub amx_bf16: bool,
    /// `maskattn::kernel_path().amx`: where the bf16 products run (`Hardware` tiles, the
    /// `Model` of them, `Off`).
    #[serde(serialize_with = "debug_name")]
    pub amx: AmxMode,
}

/// Serialises an enum of the kernel crate (which has no serde) as its variant's name:
/// `"Avx512"`, `"Hardware"`.
pub fn debug_name<T: std::fmt::Debug, S: serde::Serializer>(
    x: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{x:?}"))
}

/// The CPU's "model name" from /proc/cpuinfo ("unknown" where there is none), with its
/// family and model numbers: a virtual machine may name only the vendor's line ("AMD EPYC"),
/// and the numbers still tell the generation apart (family 25 is Zen 3/4, 26 is Zen 5).
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_model_from(&info)
}

fn cpu_model_from(cpuinfo: &str) -> String {
    let field = |key: &str| {
        cpuinfo
            .lines()
            .take_while(|l| !l.trim().is_empty()) // the first processor only
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let name = field("model name").unwrap_or_else(|| "unknown".into());
    match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f}, model {m})"),
        _ => name,
    }
}

/// The kernels' path: the instruction set in use, and whether bf16 goes to `vdpbf16ps`. The
/// kernel crate decides the latter internally; this is its rule (AVX-512 in use, the CPU has
/// AVX512-BF16 and BW, `MASKATTN_BF16_DOT` is not `0`).
pub fn paths() -> Paths {
    let isa = maskattn::current_isa();
    #[cfg(target_arch = "x86_64")]
    let (bf16_dot, (amx_tile, amx_bf16)) = (
        isa == Isa::Avx512
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
            && std::env::var("MASKATTN_BF16_DOT").as_deref() != Ok("0"),
        amx(),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (bf16_dot, (amx_tile, amx_bf16)) = (false, (false, false));
    Paths {
        cpu: cpu_model(),
        isa,
        bf16_dot,
        amx_tile,
        amx_bf16,
        amx: maskattn::kernel_path().amx,
    }
}

/// AMX-TILE and AMX-BF16 from CPUID leaf 7, sub-leaf 0, EDX bits 24 and 22.
#[cfg(target_arch = "x86_64")]
fn amx() -> (bool, bool) {
    use std::arch::x86_64::__cpuid_count;
    // CPUID exists on every x86-64 CPU; leaf 7 only where the highest leaf reaches it.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return (false, false);
    }
    let edx = __cpuid_count(7, 0).edx;
    (edx & (1 << 24) != 0, edx & (1 << 22) != 0)
}

impl Paths {
    pub fn amx_word(&self) -> &'static str {
        match (self.amx, self.amx_tile, self.amx_bf16) {
            (AmxMode::Hardware, ..) => "bf16 products on AMX tiles",
            (AmxMode::Model, ..) => "bf16 products on the plain-Rust AMX model (slow)",
            (_, true, true) => "present, unused (MASKATTN_AMX=0, or no tile state from the OS)",
            (_, true, false) => "tiles without bf16 (unused)",
            _ => "absent",
        }
    }
}

impl Peaks {
    /// The limit a row is held to: `vdpbf16ps` for bf16 on that path, else the FMA limit of
    /// the instruction set in use (none for the portable path: the compiler chooses its
    /// instructions). Returns the limit's name and GFLOP/s.
    pub fn limit_for(&self, paths: &Paths, bf16: bool) -> Option<(&'static str, f64)> {
        if bf16 && paths.bf16_dot && paths.amx == AmxMode::Hardware {
            return self.amx.map(|g| ("tdpbf16ps", g));
        }
        if bf16 && paths.bf16_dot {
            return self.bf16_dot.map(|g| ("vdpbf16ps", g));
        }
        match paths.isa {
            Isa::Avx512 => self.fma_avx512.map(|g| ("avx512 fma", g)),
            Isa::Avx2 => self.fma_avx2.map(|g| ("avx2 fma", g)),
            Isa::Neon | Isa::Portable => None,
        }
    }
}

/// A row's limit: its name, GFLOP/s and the fraction of it the row's useful GFLOP/s reach.
pub struct RowLimit(Option<(&'static str, f64, f64)>);

impl RowLimit {
    pub fn of(peaks: &Peaks, paths: &Paths, bf16: bool, useful_gflops: f64) -> RowLimit {
        RowLimit(
            peaks
                .limit_for(paths, bf16)
                .map(|(name, g)| (name, g, useful_gflops / g)),
        )
    }

    /// The table's `%limit` cell.
    pub fn cell(&self) -> String {
        self.0
            .map_or("-".into(), |(_, _, f)| format!("{:.0}%", 100.0 * f))
    }

    /// The row's JSON object with `limit`, `limit_gflops` and `limit_fraction` added (null
    /// where there is no limit).
    pub fn add_to(&self, row: impl serde::Serialize) -> serde_json::Result<serde_json::Value> {
        let mut v = serde_json::to_value(row)?;
        if let Some(m) = v.as_object_mut() {
            let (name, g, f) = self
                .0
                .map_or((None, None, None), |(n, g, f)| (Some(n), Some(g), Some(f)));
            m.insert("limit".into(), serde_json::json!(name));
            m.insert("limit_gflops".into(), serde_json::json!(g));
            m.insert("limit_fraction".into(), serde_json::json!(f));
        }
        Ok(v)
    }
}

/// The lines above the table: the CPU, the kernels' path and the peaks.
pub fn header(peaks: &Peaks, paths: &Paths) -> String {
    let g = |x: Option<f64>| x.map_or("absent".to_string(), |g| format!("{g:.1} GFLOP/s"));
    format!(
        "CPU: {}; kernels on {:?}, bf16 {}, AMX: {}\n\
         limits ({} threads, register-only loops): avx512 fma {}, avx2 fma {}, vdpbf16ps {}, amx tdpbf16ps {}; \
         %limit holds each row to the limit of its path (bf16 on AMX tiles: tdpbf16ps; bf16 on vdpbf16ps: vdpbf16ps; else the fma of the kernels' ISA), \
         %gemm to the f32 matrix product",
        paths.cpu,
        paths.isa,
        if paths.bf16_dot && paths.amx != AmxMode::Off {
            "on AMX tiles"
        } else if paths.bf16_dot {
            "on vdpbf16ps"
        } else {
            "widened to f32"
        },
        paths.amx_word(),
        peaks.threads,
        g(peaks.fma_avx512),
        g(peaks.fma_avx2),
        g(peaks.bf16_dot),
        peaks.amx.map_or("no AMX".to_string(), |x| format!("{x:.1} GFLOP/s")),
    )
}

/// The same for `--json`'s first line: `cpu`, `paths`, `limits`.
pub fn header_json(peaks: &Peaks, paths: &Paths) -> serde_json::Value {
    serde_json::json!({"cpu": paths.cpu, "paths": paths, "limits_gflops": peaks})
}

impl Peaks {
    /// Each limit the better of the two: a limit is a ceiling, and on a machine shared with
    /// other work one measuring window can fall in a busy moment (seen: a full forward at
    /// 109% of a limit measured 30% low seconds earlier).
    pub fn best_of(&self, other: &Peaks) -> Peaks {
        let best = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Peaks {
            threads: self.threads,
            fma_avx512: best(self.fma_avx512, other.fma_avx512),
            fma_avx2: best(self.fma_avx2, other.fma_avx2),
            bf16_dot: best(self.bf16_dot, other.bf16_dot),
            amx: best(self.amx, other.amx),
        }
    }
}

/// Measures every limit this CPU has.
pub fn measure() -> Peaks {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = is_x86_feature_detected!("avx512f");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let bf16 = avx512 && is_x86_feature_detected!("avx512bf16");
        Peaks {
            threads: rayon::current_num_threads(),
            // SAFETY (all three): called only where the CPU has the instructions.
            fma_avx512: avx512.then(|| rate(512, |n| unsafe { x86::fma_avx512(n) })),
            fma_avx2: avx2.then(|| rate(192, |n| unsafe { x86::fma_avx2(n) })),
            bf16_dot: bf16.then(|| rate(1024, |n| unsafe { x86::dpbf16(n) })),
            // 65536 FLOPs a round (see `maskattn::amx_tdpbf16ps_loop`).
            amx: maskattn::amx_tdpbf16ps_loop(1)
                .map(|_| rate(65536, |n| maskattn::amx_tdpbf16ps_loop(n).unwrap_or(0.0))),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Peaks {
        threads: rayon::current_num_threads(),
        fma_avx512: None,
        fma_avx2: None,
        bf16_dot: None,
        amx: None,
    }
}

/// GFLOP/s of `kernel(iterations)` (which does `flops_per_iteration` FLOPs each iteration)
/// run on every thread at once: the best of five runs of about 25 ms each.
fn rate(flops_per_iteration: u64, kernel: impl Fn(u64) -> f32 + Sync) -> f64 {
    // Sized on this thread alone, doubling until a run takes 10 ms: short runs would time
    // the waking of the pool's threads, not the loop (on a loaded machine, by 100×).
    let mut n = 1u64 << 12;
    let n = loop {
        let t = Instant::now();
        std::hint::black_box(kernel(n));
        let s = t.elapsed().as_secs_f64();
        if s >= 10e-3 || n >= 1 << 40 {
            break ((n as f64) * 25e-3 / s).max(1.0) as u64;
        }
        n *= 2;
    };
    let threads = rayon::current_num_threads() as f64;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(rayon::broadcast(|_| kernel(n)));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    threads * (n * flops_per_iteration) as f64 / best / 1e9
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 accumulators × 16 lanes, `acc = acc · a + b` (converging to 1: no overflow, no
    /// denormals). 16 × 16 × 2 = 512 FLOPs per iteration.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(n: u64) -> f32 {
        let a = _mm512_set1_ps(0.999);
        let b = _mm512_set1_ps(0.001);
        let mut acc = [_mm512_set1_ps(0.5); 16];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    /// As [`fma_avx512`] on 8-lane registers, 12 accumulators: AVX2 has 16 registers, and 16
    /// accumulators beside `a` and `b` would spill to memory (seen in the disassembly); 12
    /// still cover latency × ports (4 × 2 = 8). 12 × 8 × 2 = 192 FLOPs per iteration.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(n: u64) -> f32 {
        let a = _mm256_set1_ps(0.999);
        let b = _mm256_set1_ps(0.001);
        let mut acc = [_mm256_set1_ps(0.5); 12];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }

    /// 16 accumulators of `vdpbf16ps`: each adds 2 bf16 products per lane (16 lanes), 64
    /// FLOPs; 1024 per iteration. The products are 2^-20: the sums stay far from overflow
    /// for any run length timed here, and far above the denormals `vdpbf16ps` flushes.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(n: u64) -> f32 {
        let x = _mm512_set1_ps(1.0 / 1024.0);
        let a = _mm512_cvtne2ps_pbh(x, x);
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..n {
            for s in acc.iter_mut() {
                *s = _mm512_dpbf16_ps(*s, a, a);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_model_is_read_from_the_first_processor() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model_from(info), "AMD EPYC (family 26, model 2)");
        assert_eq!(cpu_model_from("model name : Some CPU\n"), "Some CPU");
        assert_eq!(cpu_model_from(""), "unknown");
    }

    #[test]
    fn the_cpu_model_and_paths_are_named() {
        let p = paths();
        assert!(!p.cpu.is_empty());
        assert_eq!(p.isa, maskattn::current_isa());
        if p.bf16_dot {
            assert_eq!(p.isa, Isa::Avx512);
        }
    }

    /// A row is held to the better of each limit measured before and after it.
    #[test]
    fn the_best_of_two_measurements_keeps_each_higher_limit() {
        let a = Peaks {
            threads: 2,
            fma_avx512: Some(300.0),
            fma_avx2: Some(200.0),
            bf16_dot: None,
            amx: None,
        };
        let b = Peaks {
            threads: 2,
            fma_avx512: Some(450.0),
            fma_avx2: Some(150.0),
            bf16_dot: Some(900.0),
            amx: None,
        };
        let m = a.best_of(&b);
        assert_eq!(m.fma_avx512, Some(450.0));
        assert_eq!(m.fma_avx2, Some(200.0));
        assert_eq!(m.bf16_dot, Some(900.0));
        assert_eq!(m.amx, None);
    }

    /// The header names the CPU, the paths and every limit; a row's limit follows its path
    /// (bf16 on vdpbf16ps against that, everything else against the ISA's FMA) and lands in
    /// its JSON.
    #[test]
    fn rows_are_held_to_the_limit_of_their_path() {
        let peaks = Peaks {
            threads: 2,
            fma_avx512: Some(100.0),
            fma_avx2: Some(50.0),
            bf16_dot: Some(400.0),
            amx: None,
        };
        let mut paths = Paths {
            cpu: "Some CPU 9000".into(),
            isa: Isa::Avx512,
            bf16_dot: true,
            amx_tile: false,
            amx_bf16: false,
            amx: AmxMode::Off,
        };
        let h = header(&peaks, &paths);
        // The JSON header names the sets as the kernel crate's variants.
        let j = header_json(&peaks, &paths);
        assert_eq!(j["paths"]["isa"], "Avx512");
        assert_eq!(j["paths"]["amx"], "Off");
        for want in [
            "CPU: Some CPU 9000",
            "kernels on Avx512",
            "bf16 on vdpbf16ps",
            "AMX: absent",
            "avx512 fma 100.0 GFLOP/s",
            "avx2 fma 50.0 GFLOP/s",
            "vdpbf16ps 400.0 GFLOP/s",
            "amx tdpbf16ps no AMX",
        ] {
            assert!(h.contains(want), "{want:?} not in {h}");
        }
        assert_eq!(RowLimit::of(&peaks, &paths, false, 80.0).cell(), "80%");
        assert_eq!(RowLimit::of(&peaks, &paths, true, 80.0).cell(), "20%");
        let v = RowLimit::of(&peaks, &paths, true, 80.0)
            .add_to(serde_json::json!({"useful_gflops": 80.0}))
            .unwrap();
        assert_eq!(v["limit"], "vdpbf16ps");
        assert_eq!(v["limit_gflops"], 400.0);
        assert_eq!(v["limit_fraction"], 0.2);
        paths.bf16_dot = false; // MASKATTN_BF16_DOT=0: bf16 is widened, held to the FMA
        assert_eq!(RowLimit::of(&peaks, &paths, true, 80.0).cell(), "80%");
        paths.isa = Isa::Avx2;
        assert_eq!(RowLimit::of(&peaks, &paths, false, 40.0).cell(), "80%");
        paths.isa = Isa::Portable;
        let none = RowLimit::of(&peaks, &paths, false, 40.0);
        assert_eq!(none.cell(), "-");
        assert!(none.add_to(serde_json::json!({})).unwrap()["limit"].is_null());
        let absent = Peaks {
            bf16_dot: None,
            ..peaks
        };
        assert!(header(&absent, &paths).contains("vdpbf16ps absent"));
        // bf16 on AMX tiles is held to the tdpbf16ps limit, and the header says so.
        let (amx_peaks, mut amx_paths) = (
            Peaks {
                amx: Some(1600.0),
                ..peaks
            },
            Paths {
                isa: Isa::Avx512,
                bf16_dot: true,
                amx: AmxMode::Hardware,
                ..paths
            },
        );
        assert_eq!(
            RowLimit::of(&amx_peaks, &amx_paths, true, 80.0).cell(),
            "5%"
        );
        assert_eq!(
            RowLimit::of(&amx_peaks, &amx_paths, false, 80.0).cell(),
            "80%"
        );
        let h = header(&amx_peaks, &amx_paths);
        assert!(h.contains("AMX: bf16 products on AMX tiles"), "{h}");
        assert!(h.contains("amx tdpbf16ps 1600.0 GFLOP/s"), "{h}");
        amx_paths.amx = AmxMode::Model;
        assert!(header(&amx_peaks, &amx_paths).contains("plain-Rust AMX model"));
    }

    /// The loops do the work their FLOP counts say: `n` FMAs on each of their accumulators ×
    /// lanes (checked against the same arithmetic in scalar code).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_loops_compute_what_they_count() {
        let scalar = |n: u64| {
            let mut x = 0.5f32;
            for _ in 0..n {
                x = x.mul_add(0.999, 0.001);
            }
            x
        };
        if is_x86_feature_detected!("avx512f") {
            let got = unsafe { x86::fma_avx512(3) };
            assert!((got - 256.0 * scalar(3)).abs() < 1e-3, "{got}");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let got = unsafe { x86::fma_avx2(3) };
            assert!((got - 96.0 * scalar(3)).abs() < 1e-3, "{got}");
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            // 3 iterations × 16 accumulators × 16 lanes × 2 products of 2^-20.
            let got = unsafe { x86::dpbf16(3) };
            assert_eq!(got, (3 * 16 * 16 * 2) as f32 / (1u64 << 20) as f32);
        }
        let p = measure();
        for g in [p.fma_avx512, p.fma_avx2, p.bf16_dot, p.amx]
            .into_iter()
            .flatten()
        {
            assert!(g.is_finite() && g > 0.0, "{p:?}");
        }
    }
}
