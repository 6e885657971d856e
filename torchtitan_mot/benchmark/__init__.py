"""Speed measurements: the training-step benchmark (`python -m torchtitan_mot.benchmark`,
`step_time`) and the helpers it and the GPU acceptance tests measure with (`perf`)."""
