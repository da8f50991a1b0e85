#!/bin/bash
# Kernel A/B, old binary against new (OLD=path/to/old/maskattn [NEW=...] [PYTHON=python with torch]
# bash bench/kernel_ab.sh): MASKATTN_ISA forced to avx2 and avx512, 2 threads, 3 alternating
# rounds of median_ms over 7 reps; PyTorch SDPA forced to the same ISA (ATEN_CPU_CAPABILITY) per cell.
OLD=${OLD:?path of the old maskattn binary}; NEW=${NEW:-target/release/maskattn}
for isa in avx2 avx512; do for shape in 1,8,2048,64 4,8,512,64 1,8,2048,128; do for pass in fwd fwd+bwd; do
  line="$isa $shape $pass"
  for r in 1 2 3; do for which in old new; do
    bin=$OLD; [ $which = new ] && bin=$NEW
    ms=$(MASKATTN_ISA=$isa $bin bench --threads 2 --shape $shape --pass $pass --reps 7 --json 2>/dev/null | tail -1 | python3 -c "import json,sys; print(round(json.load(sys.stdin)['median_ms'],1))")
    line="$line $which=$ms"
  done; done
  t=$(ATEN_CPU_CAPABILITY=$isa ${PYTHON:-python3} -c "
import torch,time,sys
torch.set_num_threads(2)
B,H,L,d=map(int,'$shape'.split(','))
q,k,v=(torch.randn(B,H,L,d,requires_grad=True) for _ in range(3))
def f():
    o=torch.nn.functional.scaled_dot_product_attention(q,k,v)
    if '$pass'=='fwd+bwd': o.sum().backward()
ts=[]
for i in range(8):
    a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
ts=sorted(ts[1:]); print(round(ts[len(ts)//2]*1e3,1), torch.backends.cpu.get_cpu_capability())")
  echo "$line sdpa=$t"
done; done; done
