"""The Kubernetes Indexed Job example, checked as far as a machine without a cluster
allows: the manifest is an Indexed Job whose completions, parallelism and shard
count agree, and its pods' command, run here once per completion index (with the
campaign volume and the results volume as local directories), yields shards that
merge into exactly the outcome table of a local run with the same seed.

Needs PyYAML (python3-yaml) and KVM for the probe guest.
Run: python3 -m unittest discover -s tests/cluster -v
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(ROOT, "resources", "campaigns", "k8s-indexed-job.yaml")
CAMPAIGN = os.path.join(ROOT, "tests", "cluster", "campaign.toml")

try:
    import yaml
except ImportError:  # pragma: no cover
    yaml = None


def outcome_table(report):
    with open(report) as f:
        text = f.read()
    return text.split("## Outcomes per configuration", 1)[1].split("\n## ", 1)[0]


class IndexedJob(unittest.TestCase):
    def setUp(self):
        if yaml is None:
            self.fail("PyYAML is missing (apt-get install python3-yaml)")
        with open(MANIFEST) as f:
            self.job = yaml.safe_load(f)

    def test_manifest_is_a_consistent_indexed_job(self):
        j = self.job
        self.assertEqual((j["apiVersion"], j["kind"]), ("batch/v1", "Job"))
        spec = j["spec"]
        self.assertEqual(spec["completionMode"], "Indexed")
        self.assertEqual(spec["completions"], spec["parallelism"])
        pod = spec["template"]["spec"]
        self.assertEqual(pod["restartPolicy"], "Never")
        c = pod["containers"][0]
        cmd = " ".join(c["args"])
        m = re.search(r"--shard \$\{JOB_COMPLETION_INDEX\}/(\d+)", cmd)
        self.assertIsNotNone(m, cmd)
        self.assertEqual(int(m.group(1)), spec["completions"], "one shard per completion")
        self.assertIn("--out /results/shard-${JOB_COMPLETION_INDEX}", cmd)
        mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
        volumes = {v["name"] for v in pod["volumes"]}
        self.assertEqual(set(mounts.values()), volumes)
        self.assertIn("/results", mounts)

    def test_pod_commands_shard_and_merge_like_a_local_run(self):
        if not os.path.exists("/dev/kvm"):
            raise unittest.SkipTest("SKIP (loud): no /dev/kvm for the probe guest")
        subprocess.run(["cargo", "build", "--release", "--bin", "faultvisor"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        bindir = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                              "release")
        fv = os.path.join(bindir, "faultvisor")
        tmp = tempfile.mkdtemp(prefix="fv-k8s-")
        try:
            spec = self.job["spec"]
            c = spec["template"]["spec"]["containers"][0]
            campaigns, results = os.path.join(tmp, "campaigns"), os.path.join(tmp, "results")
            os.makedirs(campaigns)
            os.makedirs(results)
            cmd = " ".join(c["args"])
            name = re.search(r"/campaigns/(\S+)", cmd).group(1)
            # The test's small campaign stands in for the ConfigMap's file.
            shutil.copy(CAMPAIGN, os.path.join(campaigns, name))
            cmd = cmd.replace("/campaigns/", campaigns + "/").replace("/results/", results + "/")
            n = spec["completions"]
            for i in range(n):
                env = dict(os.environ, JOB_COMPLETION_INDEX=str(i),
                           PATH=bindir + os.pathsep + os.environ["PATH"])
                r = subprocess.run(c["command"] + [cmd], env=env, capture_output=True,
                                   text=True, timeout=600)
                self.assertEqual(r.returncode, 0, f"pod {i}: {r.stderr}")
            shards = [os.path.join(results, f"shard-{i}") for i in range(n)]
            merged = os.path.join(tmp, "all")
            m = subprocess.run([fv, "merge", "--out", merged, *shards], capture_output=True,
                               text=True)
            self.assertEqual(m.returncode, 0, m.stderr)
            seed = re.search(r"--seed (\d+)", cmd).group(1)
            local = os.path.join(tmp, "local")
            r = subprocess.run([fv, "campaign", CAMPAIGN, "--seed", seed, "--jobs", "2",
                                "--out", local], capture_output=True, text=True, timeout=600)
            self.assertEqual(r.returncode, 0, r.stderr)

            def runs(d):
                with open(os.path.join(d, "results.jsonl")) as f:
                    return {x["run"]: x["plan"] for x in map(json.loads, filter(str.strip, f))}

            self.assertEqual(runs(merged), runs(local))
            self.assertEqual(outcome_table(os.path.join(merged, "report.md")),
                             outcome_table(os.path.join(local, "report.md")))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
