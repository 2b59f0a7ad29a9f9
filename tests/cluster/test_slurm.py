"""A campaign on a real (single-node) Slurm cluster, started and stopped here.

Debian's slurm-wlm and munge: munged, slurmctld and slurmd run as this test's own
processes with their state in a temporary directory (nothing of the host's
configuration is used or changed). The campaign runs as a Slurm array job through
resources/campaigns/slurm-array.sh (two tasks, one shard each), the shards are
merged, and the merged outcome table must equal that of the same campaign run
locally with the same seed, run for run.

Needs root (the daemons run as root), KVM for the probe guest, and slurm-wlm and
munge (ci/test.sh installs them; then FAULTVISOR_REQUIRE_SLURM=1 makes a missing
piece fail instead of skip).

Run: python3 -m unittest discover -s tests/cluster -v
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAMPAIGN = os.path.join(ROOT, "tests", "cluster", "campaign.toml")
TOOLS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo"]
SEED = "2026"  # what slurm-array.sh passes


def missing():
    why = [t for t in TOOLS if shutil.which(t) is None]
    if why:
        return "missing " + ", ".join(why) + " (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the Slurm daemons need root"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm for the probe guest"
    return None


def outcome_table(report):
    with open(report) as f:
        text = f.read()
    part = text.split("## Outcomes per configuration", 1)[1]
    return part.split("\n## ", 1)[0]


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, ports and files of its own."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(tmp, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for d in ("spool", "state", "log"):
            os.makedirs(os.path.join(tmp, d))

    def p(self, *parts):
        return os.path.join(self.tmp, *parts)

    def start(self):
        key = self.p("munge.key")
        subprocess.run(["mungekey", "-c", "-k", key], check=True, capture_output=True)
        os.chmod(key, 0o600)
        subprocess.run(["munged", "-f", f"--socket={self.p('munge.sock')}",
                        f"--key-file={key}", f"--pid-file={self.p('munged.pid')}",
                        f"--log-file={self.p('log', 'munged.log')}",
                        f"--seed-file={self.p('munged.seed')}"], check=True)
        cpus = os.cpu_count() or 2
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=fvtest
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.p('munge.sock')}
CredType=cred/munge
StateSaveLocation={self.p('state')}
SlurmdSpoolDir={self.p('spool')}
SlurmctldPidFile={self.p('slurmctld.pid')}
SlurmdPidFile={self.p('slurmd.pid')}
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldLogFile={self.p('log', 'slurmctld.log')}
SlurmdLogFile={self.p('log', 'slurmd.log')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
NodeName={self.node} CPUs={cpus} RealMemory=2000 Feature=kvm State=UNKNOWN
PartitionName=fv Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", self.conf], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", self.conf, "-N", self.node], check=True, env=self.env)
        for _ in range(100):
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                 capture_output=True, text=True).stdout
            if "idle" in out:
                return
            time.sleep(0.2)
        raise RuntimeError("the Slurm node did not become idle: " + self.logs())

    def logs(self):
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.p("log", name)
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
        return "\n".join(out)

    def stop(self):
        """Stops the daemons and waits (up to 10 s each) until they are gone."""
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            try:
                with open(self.p(pid_file)) as f:
                    pid = int(f.read().split()[0])
                os.kill(pid, 15)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)


class Slurm(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        why = missing()
        if why:
            if os.environ.get("FAULTVISOR_REQUIRE_SLURM"):
                raise RuntimeError(f"FAULTVISOR_REQUIRE_SLURM is set but: {why}")
            raise unittest.SkipTest(f"SKIP (loud): the Slurm test cannot run: {why}")
        subprocess.run(["cargo", "build", "--release", "--bin", "faultvisor"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        cls.bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                               "release")
        cls.tmp = tempfile.mkdtemp(prefix="fv-slurm-")
        cls.cluster = SlurmCluster(cls.tmp)
        try:
            cls.cluster.start()
        except Exception:
            cls.cluster.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_array_job_shards_merge_to_the_local_report(self):
        work = os.path.join(self.tmp, "work")
        os.makedirs(work)
        env = dict(self.cluster.env, PATH=self.bin + os.pathsep + os.environ["PATH"])
        script = os.path.join(ROOT, "resources", "campaigns", "slurm-array.sh")
        # Two array tasks, one CPU each, so both shards run at once on the node.
        r = subprocess.run(["sbatch", "--wait", "--parsable", "--array=0-1",
                            "--cpus-per-task=1", f"--chdir={work}",
                            f"--output={work}/slurm-%A_%a.out", script, CAMPAIGN],
                           env=env, capture_output=True, text=True, timeout=600)
        outs = ""
        for name in sorted(os.listdir(work)):
            if name.startswith("slurm-"):
                with open(os.path.join(work, name)) as f:
                    outs += f.read()
        self.assertEqual(r.returncode, 0, r.stderr + outs + self.cluster.logs())
        shards = [os.path.join(work, "results", f"shard-{i}") for i in (0, 1)]
        for s in shards:
            self.assertTrue(os.path.exists(os.path.join(s, "results.jsonl")), outs)
        merged = os.path.join(work, "results", "all")
        m = subprocess.run([os.path.join(self.bin, "faultvisor"), "merge", "--out", merged,
                            *shards], capture_output=True, text=True)
        self.assertEqual(m.returncode, 0, m.stderr)
        local = os.path.join(self.tmp, "local")
        l = subprocess.run([os.path.join(self.bin, "faultvisor"), "campaign", CAMPAIGN,
                            "--seed", SEED, "--jobs", "2", "--out", local],
                           capture_output=True, text=True, timeout=600)
        self.assertEqual(l.returncode, 0, l.stderr)

        def runs(d):
            with open(os.path.join(d, "results.jsonl")) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            return {x["run"]: x["plan"] for x in lines}

        # Same seed, same runs with the same fault plans, the same outcome table.
        self.assertEqual(runs(merged), runs(local))
        self.assertEqual(len(runs(merged)), 10)
        self.assertEqual(outcome_table(os.path.join(merged, "report.md")),
                         outcome_table(os.path.join(local, "report.md")))
        self.assertIn("sdc", outcome_table(os.path.join(merged, "report.md")))


if __name__ == "__main__":
    unittest.main()
