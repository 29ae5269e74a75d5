"""The deployment checks a schema cannot make, for scripts/validate-deploy.

Usage: validate_deploy.py compose|dockerfile|k8s|dashboard, from the repository's root, with
PyYAML installed (scripts/validate-deploy runs it in its venv). Prints each failure (and each
pass with VERBOSE=1) and a summary line; exits 1 if a check failed.
"""
import fnmatch, json, os, re, sys, tomllib
import yaml

what = sys.argv[1]
errors = []
passed = 0
# Failures are always printed; passes only with VERBOSE=1, else counted in the summary line.
verbose = os.environ.get("VERBOSE") == "1"
def check(cond, msg):
    global passed
    if cond:
        passed += 1
        if verbose:
            print("   ok    " + msg)
    else:
        print("   ERROR " + msg)
        errors.append(msg)

def duration_s(text):
    """Compose durations such as 30s, 1m30s, 500ms, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)

def run():
    if what == "compose":
        compose = yaml.safe_load(open("docker-compose.yml"))
        services = compose.get("services", {})
        nodes = sorted(s for s in services if re.fullmatch(r"chorus\d+", s))
        check(len(nodes) == 3, f"three chorus nodes: {nodes}")
        ids = set()
        for name in nodes:
            svc = services[name]
            env = svc.get("environment", {})
            check(isinstance(env, dict), f"{name}: environment is a mapping")
            deps = svc.get("depends_on", {})
            for dep in ("postgres", "redis"):
                cond = deps.get(dep, {}).get("condition") if isinstance(deps, dict) else None
                check(cond == "service_healthy", f"{name} depends on {dep} with condition service_healthy")
            check(env.get("NODE_ID") == name, f"{name}: NODE_ID={env.get('NODE_ID')}")
            ids.add(env.get("NODE_ID"))
            check(str(env.get("DATABASE_URL", "")).startswith("postgres://"), f"{name}: DATABASE_URL is postgres")
            check(str(env.get("REDIS_URL", "")).startswith("redis://"), f"{name}: REDIS_URL is set (cluster mode)")
            test = svc.get("healthcheck", {}).get("test", [])
            check(test[1:] == ["chorus", "healthcheck", "--ready"], f"{name}: healthcheck runs `chorus healthcheck --ready`")
            drain_ms = int(env.get("CHORUS__SHUTDOWN__DRAIN_TIMEOUT_MS", 10000))
            grace = duration_s(svc.get("stop_grace_period", "10s"))
            # The drain waits up to the timeout twice (background tasks, then connections).
            check(grace > 2 * drain_ms / 1000, f"{name}: stop_grace_period {grace:g}s > 2 x drain timeout {drain_ms} ms")
        check(len(ids) == len(nodes), "NODE_IDs are distinct")
        # Every service_healthy dependency needs a healthcheck, or `up` fails at run time.
        for name, svc in services.items():
            deps = svc.get("depends_on", {})
            if isinstance(deps, dict):
                for dep, spec in deps.items():
                    check(dep in services, f"{name}: depends_on {dep} is a service")
                    if spec.get("condition") == "service_healthy" and dep in services:
                        # A service built here also has the Dockerfile's HEALTHCHECK.
                        has = "healthcheck" in services[dep] or "build" in services[dep]
                        check(has, f"{name}: {dep} has a healthcheck (compose's or the Dockerfile's)")
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
                if src.startswith("."):
                    check(os.path.isfile(src) or os.path.isdir(src), f"{name}: mounted {src} exists")
                elif isinstance(vol, str) and ":" in vol:
                    check(src in (compose.get("volumes") or {}), f"{name}: named volume {src} is declared")
        nginx_deps = services.get("nginx", {}).get("depends_on", {})
        for n in nodes:
            check(nginx_deps.get(n, {}).get("condition") == "service_healthy", f"nginx waits for {n} to be healthy")
        check("3000:80" in services.get("nginx", {}).get("ports", []), "nginx publishes host port 3000 -> 80")

    elif what == "dockerfile":
        text = open("Dockerfile").read().replace("\\\n", " ")
        ignore = [l.strip().rstrip("/") for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
        def ignored(path):
            return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in ignore)
        copied = []
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].upper() != "COPY":
                continue
            args = words[1:]
            if any(a.startswith("--from") for a in args):
                continue
            srcs = [a for a in args if not a.startswith("--")][:-1]
            for src in srcs:
                check(os.path.exists(src), f"COPY source {src} exists")
                check(not ignored(src), f"COPY source {src} is not excluded by .dockerignore")
                copied.append(os.path.normpath(src))
        # What the compiler reads besides src/: include_str!/include_bytes! paths (relative to the file)
        # and sqlx::migrate! directories (relative to the crate), which must be in the image too.
        def in_image(path):
            path = os.path.normpath(path)
            return any(path == c or path.startswith(c + os.sep) for c in copied) and not ignored(path)
        for root, _, files in os.walk("src"):
            for f in files:
                if not f.endswith(".rs"):
                    continue
                file = os.path.join(root, f)
                code = open(file).read()
                for rel in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', code):
                    path = os.path.normpath(os.path.join(root, rel))
                    check(os.path.exists(path) and in_image(path), f"{file}: include of {path} is copied into the build")
                for rel in re.findall(r'migrate!\(\s*"([^"]+)"', code):
                    check(os.path.isdir(rel) and in_image(rel), f"{file}: migrations {rel} are copied into the build")
        cargo = open("Cargo.toml").read()
        check(not re.search(r"^\s*build\s*=", cargo, re.M) and not os.path.exists("build.rs"),
              "no build script outside the copied files")
        check(not re.search(r"^\[\[(bin|bench|test|example)\]\]", cargo, re.M),
              "Cargo.toml declares no extra targets whose files would be missing")
        # Cargo reads every workspace member's manifest, and wants a target file for each, even
        # when it builds only the server: the dependency layer copies the manifests and makes
        # stand-ins, and the members' real sources stay out of the image.
        members = [m for m in tomllib.loads(cargo).get("workspace", {}).get("members", []) if m != "."]
        runs = " ".join(l for l in text.splitlines() if l.split()[:1] == ["RUN"])
        for member in members:
            manifest = os.path.normpath(os.path.join(member, "Cargo.toml"))
            check(manifest in copied, f"workspace member {member}: its Cargo.toml is copied")
            check(f"{member}/src/" in runs, f"workspace member {member}: a stand-in source is made for it")
            check(not in_image(os.path.join(member, "src")), f"workspace member {member}: its sources are not copied")
        # A patched dependency is needed to resolve the others, so the dependency layer has it.
        for name, spec in tomllib.loads(cargo).get("patch", {}).get("crates-io", {}).items():
            path = spec.get("path") if isinstance(spec, dict) else None
            if path:
                check(os.path.isdir(path) and in_image(os.path.join(path, "Cargo.toml")),
                      f"patched dependency {name}: {path} is copied into the build")

    elif what == "k8s":
        docs = {}
        for f in sorted(os.listdir("deploy/k8s")):
            if f.endswith(".yaml"):
                docs[f] = yaml.safe_load(open(os.path.join("deploy/k8s", f)))
        kust = docs.pop("kustomization.yaml")
        listed = set(kust.get("resources", []))
        for f in listed:
            check(f in docs, f"kustomization resource {f} exists")
        for f in docs:
            if f != "secret.example.yaml":
                check(f in listed, f"{f} is listed in kustomization.yaml")
        check("secret.example.yaml" not in listed, "the placeholder Secret is not applied by kustomize")
        dep = docs["deployment.yaml"]
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector matches its pods")
        for f in ("service.yaml", "pdb.yaml"):
            sel = docs[f]["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            check(sel.items() <= labels.items(), f"{f} selects the Deployment's pods")
        check(dep["spec"]["replicas"] == 3, "3 replicas")
        check(docs["pdb.yaml"]["spec"]["minAvailable"] < dep["spec"]["replicas"], "PDB leaves room for one disruption")
        names = {}
        for src in c.get("envFrom", []):
            for kind in ("configMapRef", "secretRef"):
                if kind in src:
                    names[kind] = src[kind]["name"]
        check(names.get("configMapRef") == docs["configmap.yaml"]["metadata"]["name"], "envFrom names the ConfigMap")
        check(names.get("secretRef") == docs["secret.example.yaml"]["metadata"]["name"], "envFrom names the Secret")
        check(set(docs["secret.example.yaml"]["stringData"]) == {"DATABASE_URL", "REDIS_URL"}, "Secret holds DATABASE_URL and REDIS_URL")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readinessProbe on /readyz")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "livenessProbe on /healthz")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        cfg = docs["configmap.yaml"]["data"]
        check(ports.get("http") == int(cfg.get("PORT", 3000)), "containerPort matches PORT")
        drain_s = int(cfg.get("CHORUS__SHUTDOWN__DRAIN_TIMEOUT_MS", 10000)) / 1000
        pre = c["lifecycle"]["preStop"]
        pre_s = pre["sleep"]["seconds"] if "sleep" in pre else int(pre["exec"]["command"][-1])
        grace = pod["terminationGracePeriodSeconds"]
        check(grace > pre_s + 2 * drain_s, f"terminationGracePeriodSeconds {grace} > preStop {pre_s} + 2 x drain {drain_s:g}")
        ing = docs["ingress.yaml"]["metadata"]["annotations"]
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            value = int(ing.get("nginx.ingress.kubernetes.io/" + key, 60))
            check(value > 45, f"ingress {key} {value}s > Socket.IO ping interval + timeout (45 s)")
        check(ing.get("nginx.ingress.kubernetes.io/affinity") == "cookie", "ingress has cookie affinity")

    elif what == "dashboard":
        path = "deploy/grafana/chorus-dashboard.json"
        dash = json.load(open(path))
        print(f"   parsed {path}: {len(dash.get('panels', []))} panels, schemaVersion {dash.get('schemaVersion')}")
        check(any(i.get("name") == "DS_PROMETHEUS" for i in dash.get("__inputs", [])), "declares the DS_PROMETHEUS input")
        used = set()
        panels = list(dash.get("panels", []))
        for p in list(panels):
            panels.extend(p.get("panels", []))
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
        for var in dash.get("templating", {}).get("list", []):
            q = var.get("query", "")
            q = q.get("query", "") if isinstance(q, dict) else q
            # label_values(METRIC, LABEL): only the first argument is a metric.
            m = re.fullmatch(r"\s*label_values\(\s*([^,]+),\s*\w+\s*\)\s*", q)
            exprs.append(m.group(1) if m else q)
        # Metric names in PromQL: drop strings, label matchers, ranges and by/without/on/ignoring
        # label lists, then every identifier that is not a function call or a keyword is a metric.
        keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                    "or", "unless", "offset", "inf", "nan"}
        for expr in exprs:
            e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
            e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
            e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
            for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", e):
                if name.lower() not in keywords:
                    used.add(name)
        # That each chorus_* series exists is checked against the server's own rendered
        # /metrics by the unit test metrics::tests::the_dashboard_queries_only_exported_series.
        for name in sorted(used):
            check(name.startswith("chorus_"), f"dashboard metric {name} is a chorus series")
        for p in panels:
            if p.get("type") != "row":
                check(p.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", f"panel '{p.get('title')}' uses ${{DS_PROMETHEUS}}")
        print(f"   metrics used: {', '.join(sorted(used))}")

try:
    run()
except Exception as exc:  # a missing key or a value of the wrong type
    check(False, f"could not finish the {what} checks: {type(exc).__name__}: {exc}")
print(f"   {passed} {what} checks passed, {len(errors)} failed")
if errors:
    sys.exit(1)
