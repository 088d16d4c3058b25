import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// docs/schemas: one JSON Schema per JSON output (issue 12), checked by Debian's python3-jsonschema
/// (installed by `scripts/setup --for-tests`), never by the decoders of the code under test.
enum JSONSchemas {
    static let directory = "\(Checkout.root)/docs/schemas"

    /// Every `NAME` of `docs/schemas/NAME.schema.json`.
    static var names: Set<String> {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return Set(entries.filter { $0.hasSuffix(".schema.json") }.map { String($0.dropLast(".schema.json".count)) })
    }

    /// argv: schema path, `document` (stdin is one JSON document) or `lines` (one per line).
    /// Prints each violation as `/json/pointer: message`, the innermost ones of `anyOf`s.
    static let validator = #"""
        import json, sys, jsonschema
        schema = json.load(open(sys.argv[1]))
        text = sys.stdin.read()
        try:
            if sys.argv[2] == "lines":
                documents = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                documents = [json.loads(text)]
        except ValueError as error:
            sys.exit("not %s: %s" % ("JSON lines" if sys.argv[2] == "lines" else "exactly one JSON document", error))
        if not documents:
            sys.exit("no JSON at all")
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        def leaves(error):
            if error.context:
                for inner in error.context:
                    yield from leaves(inner)
            else:
                yield error
        found = sorted({"/" + "/".join(map(str, leaf.absolute_path)) + ": " + leaf.message[:300]
                        for document in documents for error in validator.iter_errors(document) for leaf in leaves(error)})
        print("\n".join(found))
        sys.exit(1 if found else 0)
        """#

    /// nil when `output` holds up against `docs/schemas/NAME.schema.json`, else what the validator said.
    static func violations(of output: String, against name: String, lines: Bool = false) throws -> String? {
        let result = try Python.run(validator, arguments: ["\(directory)/\(name).schema.json", lines ? "lines" : "document"], input: Data(output.utf8))
        guard result.status != 0 else { return nil }
        return (String(decoding: result.stdout, as: UTF8.self) + result.stderr).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Every schema is a valid draft 2020-12 schema with the `$id` of its file name, and a
    /// definition copied into several files has the same text in all of them.
    static let consistency = #"""
        import glob, json, os, sys, jsonschema
        problems, seen = [], {}
        for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.schema.json"))):
            name = os.path.basename(path)
            schema = json.load(open(path))
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as error:
                problems.append("%s: %s" % (name, error.message))
            if schema.get("$schema") != "https://json-schema.org/draft/2020-12/schema":
                problems.append("%s: $schema is not draft 2020-12" % name)
            if schema.get("$id") != "https://vmtemplate.invalid/schemas/" + name:
                problems.append("%s: $id is %r" % (name, schema.get("$id")))
            for key, definition in schema.get("$defs", {}).items():
                if key in seen and seen[key][1] != definition:
                    problems.append("%s: $defs/%s differs from the one in %s" % (name, key, seen[key][0]))
                seen.setdefault(key, (name, definition))
        print("\n".join(problems))
        sys.exit(1 if problems else 0)
        """#
}

@Suite("docs/schemas", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"), "needs python3-jsonschema: run scripts/setup --for-tests"))
struct JSONSchemaFileTests {
    @Test("every schema is valid draft 2020-12 with its own $id; shared definitions are the same everywhere")
    func schemasHoldTogether() throws {
        #expect(JSONSchemas.names.count >= 17, "\(JSONSchemas.names.sorted())")
        let result = try Python.run(JSONSchemas.consistency, arguments: [JSONSchemas.directory], input: Data())
        #expect(result.status == 0, "\(String(decoding: result.stdout, as: UTF8.self))\(result.stderr)")
    }

    @Test("scripts/generate-schemas makes exactly the files of docs/schemas")
    func generated() throws {
        let directory = NSTemporaryDirectory() + "vmtemplate-schemas-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let result = try ShortCommand.run("/usr/bin/python3", ["\(Checkout.root)/scripts/generate-schemas", directory])
        #expect(result.status == 0, "\(result.stderr)")
        let made = Set(try FileManager.default.contentsOfDirectory(atPath: directory))
        #expect(made == Set(JSONSchemas.names.map { "\($0).schema.json" }), "made \(made.sorted()), docs/schemas has \(JSONSchemas.names.sorted())")
        for name in made.sorted() {
            #expect(FileManager.default.contents(atPath: "\(directory)/\(name)") == FileManager.default.contents(atPath: "\(JSONSchemas.directory)/\(name)"), "docs/schemas/\(name) is not what scripts/generate-schemas makes: edit the script and run it")
        }
    }
}

/// Each JSON output of the CLI and each API body, printed for real, against its schema: keys
/// snake_case and all present (null when absent), enums fixed strings, sizes in bytes, times in
/// RFC 3339, modes octal strings (issue 12).
extension RealGuests {
    @Suite("JSON outputs match docs/schemas", .serialized)
    struct JSONSchemaTests {
        static func object(_ json: String) -> [String: Any]? {
            try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        }

        @Test("clone, list, inspect, create, explain, device, pool, settings, gc, verify, doctor, scheduler, errors and the API bodies validate against docs/schemas")
        func everyOutput() async throws {
            let store = try TemporaryStore("schema")
            let arguments = store.arguments
            var server: CLI.Running?
            defer {
                if let server {
                    server.process.terminate()
                    server.process.waitUntilExit()
                    _ = server.result()
                }
                _ = try? CLI.run(["pool", "set", "busybox", "--size", "0"] + arguments)
                _ = try? CLI.run(["rm", "--all"] + arguments)
                store.remove()
            }
            var checked: Set<String> = []

            /// Runs `vmtemplate ARGUMENTS`, expects `status`, and validates its stdout against `schema`.
            @discardableResult
            func check(_ commandArguments: [String], _ schema: String, status: Int32 = 0, lines: Bool = false) throws -> CommandResult {
                let result = try CLI.run(commandArguments)
                let shown = commandArguments.prefix { $0 != "--store" }.joined(separator: " ")
                checked.insert(schema)
                #expect(result.status == status, "vmtemplate \(shown): exit \(result.status), expected \(status): \(result.stderr)")
                let problems = try JSONSchemas.violations(of: result.stdout, against: schema, lines: lines)
                #expect(problems == nil, "vmtemplate \(shown) does not match docs/schemas/\(schema).schema.json:\n\(problems ?? "")\noutput: \(result.stdout)")
                return result
            }

            // Templates, settings, the host.
            let created = try check(["create", "busybox", "--recipe", Checkout.busyboxRecipe, "--json"] + arguments, "manifest")
            try #require(created.status == 0, "\(created.stderr)")
            try check(["inspect", "busybox", "--json"] + arguments, "inspect")
            try check(["verify", "busybox", "--json"] + arguments, "verify")
            try check(["explain", "share=off,readonly=on,rom=off", "--json"], "explain")
            try check(["explain", "share=on,readonly=on,rom=off", "--json"], "explain", status: 2)
            try check(["explain", "readonly=on", "--file", "\(store.templateDirectory("busybox"))/memory", "--json"], "explain")
            try check(["settings", "--json"] + arguments, "settings")
            try check(["settings", "--max-clones", "16", "--memory-budget", "4G", "--json"] + arguments, "settings")
            _ = try CLI.run(["settings", "--max-clones", "none", "--memory-budget", "none"] + arguments)
            try check(["doctor", "--json"], "doctor")
            try check(["doctor", "--qemu", "/nonexistent/qemu-system-x86_64", "--json"], "doctor", status: 1)
            try check(["pool", "ls", "--json"] + arguments, "pools")
            try check(["gc", "--json"] + arguments, "gc")

            // Clones: one without a fresh vmgenid (null), one with a limit and a NIC; a disk
            // hot-plugged into the first.
            let first = try check(["clone", "busybox", "--name", "a", "--no-vmgenid", "--json"] + arguments, "clone")
            try #require(first.status == 0, "\(first.stderr)")
            let second = try check(["clone", "busybox", "--name", "b", "--cow-limit", "64M", "--over-limit", "pause", "--nic", "user", "--json"] + arguments, "clone")
            try #require(second.status == 0, "\(second.stderr)")
            let image = "\(store.root)/disk.img"
            try #require(FileManager.default.createFile(atPath: image, contents: nil))
            let handle = try #require(FileHandle(forWritingAtPath: image))
            try handle.truncate(atOffset: 16 << 20)
            try handle.close()
            try check(["device", "add", "a", "--disk", "path=\(image),overlay=on", "--json"] + arguments, "devices")
            try check(["device", "list", "a", "--json"] + arguments, "devices")
            try check(["device", "list", "b", "--json"] + arguments, "devices")

            // The scheduler pauses b over its limit: its log line, and the record's last_enforcement.
            let dirtied = try CLI.run(["send", "b", "dirty 80"] + arguments)
            #expect(dirtied.stdout.contains("dirtied 80"), "\(dirtied.stdout) \(dirtied.stderr)")
            let actions = try check(["scheduler", "--once"] + arguments, "scheduler", lines: true)
            #expect(actions.stdout.contains("\"action\":\"pause\""), "\(actions.stdout)")
            try check(["inspect", "b", "--json"] + arguments, "inspect")
            try check(["inspect", "a", "--json"] + arguments, "inspect")

            // A warm pool: a pooled member in the listing, then handed out (three clones at most).
            _ = try CLI.run(["pool", "set", "busybox", "--size", "1"] + arguments)
            let filled = try CLI.run(["pool", "fill", "busybox"] + arguments)
            #expect(filled.status == 0, "\(filled.stderr)")
            try check(["pool", "ls", "--json"] + arguments, "pools")
            try check(["list", "--json"] + arguments, "list")
            let pooled = try check(["clone", "busybox", "--name", "c", "--json"] + arguments, "clone")
            _ = try CLI.run(["pool", "set", "busybox", "--size", "0"] + arguments)
            #expect(Self.object(pooled.stdout)?["from_pool"] as? Bool == true, "\(pooled.stdout)")

            // An exited clone: no memory to measure, and its absent values are null, not left out.
            let pid = try #require(Self.object(pooled.stdout)?["pid"] as? Int, "\(pooled.stdout)")
            kill(pid_t(pid), SIGKILL)
            #expect(await eventually(timeout: .seconds(10)) {
                (try? CLI.run(["list", "--json"] + arguments))?.stdout.contains("\"state\":\"exited\"") == true
            }, "clone c shows as exited")
            try check(["list", "--json"] + arguments, "list")
            try check(["inspect", "c", "--json"] + arguments, "inspect")
            try check(["gc", "--json"] + arguments, "gc")

            // Errors on stdout with --json.
            try check(["clone", "nosuch", "--json"] + arguments, "error", status: 66)
            try check(["inspect", "nosuch", "--json"] + arguments, "error", status: 66)
            try check(["clone", "busybox", "--disk", "path=/nonexistent.img", "--json"] + arguments, "error", status: 66)
            // Usage errors found by the argument parser count too: stdout is all a caller reads.
            try check(["clone", "--json"] + arguments, "error", status: 64)
            try check(["clone", "busybox", "--timeout", "0", "--json"] + arguments, "error", status: 64)

            // A template between nodes: exported to an OCI layout, imported under another name
            // (push and pull print the same objects; DistributionIntegrationTests checks them).
            let layout = "\(store.root)/layout"
            try check(["export", "busybox", layout, "--json"] + arguments, "push")
            try check(["import", layout, "--name", "imported", "--json"] + arguments, "pull")
            try check(["inspect", "imported", "--json"] + arguments, "inspect")
            #expect(try CLI.run(["rm-template", "imported"] + arguments).status == 0)

            // The API: the same objects as the CLI where the CLI has them.
            server = try CLI.start(["serve", "--fill-pause", "0"] + arguments)
            #expect(await eventually(timeout: .seconds(30)) { (try? CLI.run(["api", "GET", "/v1/pools"] + arguments))?.status == 0 }, "the server answers")
            try check(["api", "GET", "/v1/clones"] + arguments, "clones")
            try check(["api", "GET", "/v1/clones/a"] + arguments, "clone")
            try check(["api", "GET", "/v1/templates"] + arguments, "templates")
            try check(["api", "GET", "/v1/pools"] + arguments, "pools")
            try check(["api", "GET", "/v1/version"] + arguments, "version")
            try check(["api", "GET", "/v1/health"] + arguments, "health")
            // A descriptor handed over (a read-only image), as `deposit` prints its token.
            let deposited = try ShortCommand.run("/bin/sh", ["-c", "exec \"$0\" deposit 3 --store \"$1\" 3<\"$0\"", Checkout.binary, store.root])
            checked.insert("deposit")
            #expect(deposited.status == 0, "\(deposited.stderr)")
            let depositProblems = try JSONSchemas.violations(of: deposited.stdout, against: "deposit")
            #expect(depositProblems == nil, "vmtemplate deposit does not match docs/schemas/deposit.schema.json:\n\(depositProblems ?? "")\noutput: \(deposited.stdout)")
            try check(["api", "PUT", "/v1/pools/busybox", #"{"size": 0}"#] + arguments, "pool")
            let made = try check(["api", "POST", "/v1/clones", #"{"template": "busybox", "name": "d", "no_pool": true}"#] + arguments, "clone")
            if let id = Self.object(made.stdout)?["id"] as? String {
                try check(["api", "DELETE", "/v1/clones/\(id)"] + arguments, "removed")
            }
            try check(["api", "GET", "/v1/clones/nosuch"] + arguments, "error", status: 66)
            try check(["api", "POST", "/v1/clones", #"{"template": "nosuch"}"#] + arguments, "error", status: 66)
            try check(["api", "POST", "/v1/clones", #"{"template": "busybox", "cow_limt": "1M"}"#] + arguments, "error", status: 64)
            // Every event so far (template, clones, pool members, devices, pauses, removals), from
            // the journal and from the API.
            try check(["events", "--json"] + arguments, "event", lines: true)
            try check(["api", "GET", "/v1/events?since=0"] + arguments, "event", lines: true)
            if let running = server {
                running.process.terminate()
                running.process.waitUntilExit()
                _ = running.result()
                server = nil
            }

            // A template whose memory file is gone: verify names it (null digest and size) and
            // exits 65, with one JSON document on stdout.
            let removed = try CLI.run(["rm", "--all"] + arguments)
            #expect(removed.status == 0, "\(removed.stderr)")
            let directory = store.templateDirectory("busybox")
            chmod(directory, 0o755)
            #expect(rename("\(directory)/memory", "\(store.root)/memory.aside") == 0)
            let verified = try CLI.run(["verify", "busybox", "--json"] + arguments)
            checked.insert("verify")
            #expect(verified.status == 65, "\(verified.stderr)")
            let asResult = try JSONSchemas.violations(of: verified.stdout, against: "verify")
            let asError = try JSONSchemas.violations(of: verified.stdout, against: "error")
            #expect(asResult == nil || asError == nil, "verify --json of a damaged template matches neither verify.schema.json (\(asResult ?? "")) nor error.schema.json (\(asError ?? "")):\n\(verified.stdout)")

            // Every schema was used.
            #expect(checked == JSONSchemas.names, "schemas no output was checked against: \(JSONSchemas.names.subtracting(checked).sorted()); outputs without a schema: \(checked.subtracting(JSONSchemas.names).sorted())")
        }
    }
}
