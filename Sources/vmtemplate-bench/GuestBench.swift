import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The Debian guest (templates/debian) against a cold boot and against the busybox guest, side by
/// side in one run (issue 20; docs/benchmarks.md, "A real guest").
struct GuestBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest",
        abstract: "The Debian guest: cold boot to ready against clone to the first guest-exec answer (fresh and from a pool), its clone against a busybox clone, and what an idle clone of each costs.",
        discussion: """
            Cold boots are `vmtemplate create` of the Debian recipe (its boot_to_ready: boot until the \
            guest agent answers and `systemctl is-system-running --wait` returned). Then, interleaved \
            per run: `vmtemplate clone --no-pool` of busybox and of Debian (its root disk through a \
            per-clone overlay), and `vmtemplate clone` + `vmtemplate exec -- true` of Debian, fresh \
            and from a pool of 1 (refilled between runs, untimed). Last, --idle clones of each template \
            sit for --settle seconds, then their QEMUs' CPU time over --idle-seconds and their memory.
            """
    )

    @Option(help: "Interleaved runs of each clone measurement.")
    var runs = 10

    @Option(help: "Cold boots of the Debian guest (each ~15-20 s under TCG).")
    var boots = 3

    @Option(help: "Idle clones of each template for the memory and CPU figures.")
    var idle = 4

    @Option(help: "Seconds the idle clones settle before their CPU is measured.")
    var settle = 20.0

    @Option(help: "Seconds over which idle CPU is measured.")
    var idleSeconds = 10.0

    @Option(name: .customLong("vmtemplate"), help: ArgumentHelp("vmtemplate binary to time (default: the one next to this executable).", valueName: "path"))
    var vmtemplatePath: String?

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let checkout = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            let root = try Self.checkoutRoot(from: checkout.path)
            let busybox = try await Workspace.prepare(.init(storePath: nil, templateName: "busybox", recipePath: "\(root)/templates/busybox/template.json", vmtemplatePath: vmtemplatePath), log: log)
            let debianRecipe = "\(root)/templates/debian/template.json"
            guard FileManager.default.fileExists(atPath: "\(root)/templates/debian/out/root.img") else {
                throw BenchError("templates/debian/out is missing: run scripts/setup --debian")
            }
            let debian = try await Workspace.prepare(.init(storePath: busybox.store.root, templateName: "debian", recipePath: debianRecipe, vmtemplatePath: vmtemplatePath), log: log)
            let store = debian.store.root
            let vmtemplate = debian.vmtemplate

            log.note("\(boots) cold boots of the Debian guest (vmtemplate create)")
            var coldBoots: [Double] = []
            for index in 0..<boots {
                let name = "cold\(index)"
                _ = try await CLI.timed(debian, vmtemplate, ["create", name, "--recipe", debianRecipe, "--accel", "tcg", "--store", store])
                let manifest = try debian.store.template(named: EntityName(name)).manifest
                coldBoots.append(manifest.timings.bootToReady)
                _ = try await CLI.timed(debian, vmtemplate, ["rm-template", name, "--store", store])
            }

            _ = try await CLI.timed(debian, vmtemplate, ["pool", "set", "debian", "--size", "1", "--store", store])
            var busyboxClone: [Double] = [], debianClone: [Double] = [], freshToExec: [Double] = [], pooledToExec: [Double] = []
            var phases: [String: [CloneTimings]] = [:]
            log.note("\(runs) interleaved runs")
            for run in 0..<runs {
                let noPool = CloneSettings(arguments: ["--no-pool"])
                // Each clone alone: a resumed guest's first seconds of work (a Debian clone's setup)
                // must not fall on the other's measurement; which goes first alternates.
                for workspace in run % 2 == 0 ? [busybox, debian] : [debian, busybox] {
                    let made = try await CLI.clone(workspace, noPool)
                    try await CLI.remove(workspace, [made.clone])
                    if workspace.template == busybox.template { busyboxClone.append(made.seconds) } else { debianClone.append(made.seconds) }
                    if let timings = made.clone.timings { phases[workspace.template.value, default: []].append(timings) }
                }

                freshToExec.append(try await cloneToExec(debian, settings: noPool))
                _ = try await CLI.timed(debian, vmtemplate, ["pool", "fill", "debian", "--store", store])
                pooledToExec.append(try await cloneToExec(debian, settings: CloneSettings()))
                log.note("run \(run + 1)/\(runs)")
            }
            _ = try await CLI.timed(debian, vmtemplate, ["pool", "set", "debian", "--size", "0", "--store", store])

            log.note("\(idle) idle clones of each template")
            var idleClones: [(template: String, clone: CLIClone)] = []
            for _ in 0..<idle {
                idleClones.append(("busybox", try await CLI.clone(busybox, CloneSettings(arguments: ["--no-pool"])).clone))
                idleClones.append(("debian", try await CLI.clone(debian, CloneSettings(arguments: ["--no-pool"])).clone))
            }
            try await Task.sleep(for: .seconds(settle))
            let before = idleClones.map { ProcessStat.read(pid: $0.clone.pid ?? 0)?.cpuTicks ?? 0 }
            try await Task.sleep(for: .seconds(idleSeconds))
            let after = idleClones.map { ProcessStat.read(pid: $0.clone.pid ?? 0)?.cpuTicks ?? 0 }
            let ticksPerSecond = Double(sysconf(Int32(_SC_CLK_TCK)))
            // What `vmtemplate list --json` reports of them (smaps, measured by the CLI).
            let listed = try await CLI.output(debian, vmtemplate, ["list", "--json", "--store", store])
            let clones = (try JSONSerialization.jsonObject(with: Data(listed.utf8)) as? [String: Any])?["clones"] as? [[String: Any]] ?? []
            func idleFigures(_ template: String) -> (cpu: Summary, privateBytes: Summary, cow: Summary) {
                let indices = idleClones.indices.filter { idleClones[$0].template == template }
                let cpu = indices.map { Double(after[$0] &- before[$0]) / ticksPerSecond / idleSeconds * 100 }
                let ids = Set(indices.map { idleClones[$0].clone.id })
                let measured = clones.filter { ids.contains($0["id"] as? String ?? "") }
                func figure(_ key: String) -> Summary { Summary(measured.compactMap { ($0[key] as? NSNumber)?.doubleValue }) }
                return (Summary(cpu), figure("private_bytes"), figure("cow_bytes"))
            }
            let busyboxIdle = idleFigures("busybox"), debianIdle = idleFigures("debian")
            try await CLI.remove(debian, idleClones.map(\.clone))

            let cold = Summary(coldBoots)
            let fresh = Summary(freshToExec), pooled = Summary(pooledToExec)
            let bb = Summary(busyboxClone), deb = Summary(debianClone)
            print("The Debian guest (\(debian.manifest.machine.memoryBytes >> 20) MiB, root disk through a per-clone overlay), \(runs) interleaved runs; \(debian.host.date), \(debian.host.cores) cores, kernel \(debian.host.kernel), \(debian.host.qemu), load \(HostFacts.current(qemuPath: debian.qemuPath).loadAverage)")
            print(Format.table(["measurement", "runs", "median", "min", "max"], [
                Summary.tableRow("cold boot to ready (create's boot_to_ready)", cold),
                Summary.tableRow("clone + first guest-exec answer, fresh", fresh),
                Summary.tableRow("clone + first guest-exec answer, from a pool", pooled),
                Summary.tableRow("vmtemplate clone --no-pool, busybox", bb),
                Summary.tableRow("vmtemplate clone --no-pool, Debian", deb),
            ]))
            print("cold boot / clone to first answer: fresh \(Format.ratio(cold.median / fresh.median)), from a pool \(Format.ratio(cold.median / pooled.median))")
            print("Debian clone / busybox clone: \(Format.ratio(deb.median / bb.median)) (target <= 1.10)")
            print("phases inside the CLI (clone --json's timings, medians):")
            let names: [(String, KeyPath<CloneTimings, Double>)] = [("admission", \.admission), ("spawn", \.spawn), ("restore", \.restore), ("devices", \.devices), ("resume", \.resume), ("records", \.records), ("total", \.total)]
            print(Format.table(["template"] + names.map(\.0), ["busybox", "debian"].map { template in
                [template] + names.map { name in Format.milliseconds(Summary((phases[template] ?? []).map { $0[keyPath: name.1] }).median) }
            }))
            print("")
            print("\(idle) idle clones of each, after \(Int(settle)) s, over \(Int(idleSeconds)) s (medians):")
            print(Format.table(["template", "QEMU CPU %", "QEMU private", "copy-on-write"], [
                ["busybox", String(format: "%.2f", busyboxIdle.cpu.median), Format.mebibytes(busyboxIdle.privateBytes.median), Format.mebibytes(busyboxIdle.cow.median)],
                ["debian", String(format: "%.2f", debianIdle.cpu.median), Format.mebibytes(debianIdle.privateBytes.median), Format.mebibytes(debianIdle.cow.median)],
            ]))
        }
    }

    /// From `vmtemplate clone` until `vmtemplate exec NAME -- true` returned: what a runtime waits
    /// until its first command ran in the guest. The clone is removed (untimed).
    func cloneToExec(_ workspace: Workspace, settings: CloneSettings) async throws -> Double {
        let started = ContinuousClock.now
        let (_, clone) = try await CLI.clone(workspace, settings)
        _ = try await CLI.timed(workspace, workspace.vmtemplate, ["exec", clone.id, "--store", workspace.store.root, "--", "true"])
        let seconds = started.duration(to: .now).seconds
        try await CLI.remove(workspace, [clone])
        return seconds
    }

    /// The checkout this bench was built in: the directory above `.build*`.
    static func checkoutRoot(from executable: String) throws -> String {
        var directory = URL(fileURLWithPath: executable).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("templates/debian/template.json").path) { return directory.path }
            directory = directory.deletingLastPathComponent()
        }
        throw BenchError("cannot find the checkout (templates/debian/template.json) above \(executable): run the bench from the checkout's build directory")
    }
}
