"""sepconv.deploy: the device side. Runs .tflite and .onnx artifacts with only numpy and LiteRT / ONNX Runtime.

    from sepconv.deploy import open_runtime
    runtime = open_runtime("model.tflite")
    probabilities = runtime.run([images])[0]      # float in, float out; quantized tensors handled

    from sepconv.deploy import benchmark
    report = benchmark(["original.tflite", "small_int8.tflite"], threads=(1, 2))   # what bench-model runs
    report.cases[1].latency_ms["p50"], report.cases[1].speedup      # a Case per artifact and thread count
    print(report.table())                                            # bench-model's table; report.to_dict(): its JSON

    from sepconv.deploy import deploy
    for result in deploy(["pi@raspberrypi.local"], ["small_int8.tflite"]):   # what deploy-model runs: a HostResult
        print(result.host, result.report.benchmark.table() if result.ok else result.error)   # per host, in order

This package never imports TensorFlow, directly or through a dependency: it is what runs on a Raspberry Pi.
"""

from sepconv.deploy.bench import BenchOptions, BenchReport, Case, benchmark
from sepconv.deploy.errors import (ArtifactError, InputDataError, InvalidOptionError, RuntimeMissingError,
                                   SepconvError)
from sepconv.deploy.remote import DeployOptions, HostReport, HostResult, deploy
from sepconv.deploy.runtime import Runtime, TensorSpec, open_runtime
from sepconv.deploy.ssh import SshOptions

__all__ = ["ArtifactError", "BenchOptions", "BenchReport", "Case", "DeployOptions", "HostReport", "HostResult",
           "InputDataError", "InvalidOptionError", "Runtime", "RuntimeMissingError", "SepconvError", "SshOptions",
           "TensorSpec", "benchmark", "deploy", "open_runtime"]
