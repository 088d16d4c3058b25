import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// A clone with a NIC and an overlay disk against a plain one, and how long a hot-plugged device
/// takes to appear in the guest (docs/benchmarks.md, "Devices").
struct DevicesBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "devices",
        abstract: "Clone with a tap NIC and an overlay disk vs a plain clone; device add until the guest sees it. Needs root (a network namespace)."
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Interleaved runs of each kind of clone.")
    var runs = 15

    @Option(help: "device add runs (a disk and a NIC each).")
    var addRuns = 5

    @Option(name: .customLong("also-vmtemplate"), help: ArgumentHelp("An older vmtemplate binary whose plain clones are timed in the same runs (a plain clone must not get slower).", valueName: "path"))
    var otherVMTemplate: String?

    func validate() throws {
        guard runs >= 1, addRuns >= 1 else { throw ValidationError("counts must be at least 1") }
        guard getuid() == 0 else { throw ValidationError("the devices benchmark needs root: it makes a network namespace for the clones' taps") }
    }

    struct Results: Codable {
        var host: HostFacts
        var plain: Summary
        var devices: Summary
        /// `clone --wait-devices` with the same devices: until the guest sees both.
        var devicesSeen: Summary
        var otherPlain: Summary?
        var otherVMTemplate: String?
        var deviceAddDisk: Summary
        var diskVisible: Summary
        var deviceAddNIC: Summary
        var nicVisible: Summary
        var targets: [Target]

        enum CodingKeys: String, CodingKey {
            case host, plain, devices, targets
            case devicesSeen = "devices_seen"
            case otherPlain = "other_plain"
            case otherVMTemplate = "other_vmtemplate"
            case deviceAddDisk = "device_add_disk"
            case diskVisible = "disk_visible_after_add"
            case deviceAddNIC = "device_add_nic"
            case nicVisible = "nic_visible_after_add"
        }
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            let namespace = "vmtbench-\(getpid())"
            try shell("ip netns add \(namespace)")
            defer { _ = try? shell("ip netns delete \(namespace)") }
            let base = "\(workspace.scratch)/base.raw"
            try shell("truncate -s 64M \(base)")
            var tapNumber = 0
            func withDevices(waiting: Bool = false) -> CloneSettings {
                tapNumber += 1
                // A tap vmtemplate makes in the namespace (and that goes with the clone), and a
                // qcow2 overlay of its own on the base; --wait-devices: until the guest sees both.
                return CloneSettings(arguments: ["--nic", "tap=vmtb\(tapNumber),netns=/run/netns/\(namespace)", "--disk", "path=\(base),overlay=on"] + (waiting ? ["--wait-devices"] : []))
            }

            log.note("warm-up")
            for settings in [CloneSettings(), withDevices()] {
                let warm = try await CLI.clone(workspace, settings)
                _ = try await ControlChannel.request("ping", socket: warm.clone.controlSocket, expecting: "pong")
                try await CLI.remove(workspace, [warm.clone])
            }
            if let otherVMTemplate {
                let warm = try await CLI.clone(workspace, CloneSettings(), binary: otherVMTemplate)
                try await CLI.remove(workspace, [warm.clone])
            }

            var plain: [Double] = []
            var devices: [Double] = []
            var devicesSeen: [Double] = []
            var otherPlain: [Double] = []
            let kinds = otherVMTemplate == nil ? 3 : 4
            for run in 0..<runs {
                log.note("run \(run + 1)/\(runs)")
                for step in 0..<kinds {
                    switch (step + run) % kinds {
                    case 0:
                        let (seconds, clone) = try await CLI.clone(workspace)
                        plain.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    case 1:
                        let (seconds, clone) = try await CLI.clone(workspace, withDevices())
                        devices.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    case 2:
                        let (seconds, clone) = try await CLI.clone(workspace, withDevices(waiting: true))
                        devicesSeen.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    default:
                        let (seconds, clone) = try await CLI.clone(workspace, CloneSettings(), binary: otherVMTemplate)
                        otherPlain.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    }
                }
            }

            var addDisk: [Double] = []
            var diskSeen: [Double] = []
            var addNIC: [Double] = []
            var nicSeen: [Double] = []
            for run in 0..<addRuns {
                log.note("device add \(run + 1)/\(addRuns)")
                let clone = try await CLI.clone(workspace).clone
                // A guest that has run a while, as a runtime's would be when it adds a device.
                _ = try await ControlChannel.request("ping", socket: clone.controlSocket, expecting: "pong")
                _ = try await ControlChannel.request("ping", socket: clone.controlSocket, expecting: "pong")
                for kind in ["disk", "nic"] {
                    let spec = kind == "disk" ? ["--disk", "path=\(base),overlay=on"] : ["--nic", "tap=vmta\(run),netns=/run/netns/\(namespace)"]
                    let child = try ChildProcess.spawn(workspace.vmtemplate, ["device", "add", clone.id] + spec + ["--store", workspace.store.root], outputBase: "\(workspace.scratch)/add-\(run)-\(kind)")
                    let (status, returned) = try await child.wait()
                    let started = child.started
                    defer { child.removeOutput() }
                    guard status == 0 else { throw BenchError("device add failed: \(child.stderr)") }
                    let (request, wanted) = kind == "disk" ? ("disks", "vda=") : ("ifaces", "eth0=")
                    while true {
                        let reply = try await ControlChannel.request(request, socket: clone.controlSocket, expecting: "").reply
                        if reply.contains(wanted) { break }
                    }
                    let seen = ContinuousClock.now
                    if kind == "disk" {
                        addDisk.append(started.duration(to: returned).seconds)
                        diskSeen.append(returned.duration(to: seen).seconds)
                    } else {
                        addNIC.append(started.duration(to: returned).seconds)
                        nicSeen.append(returned.duration(to: seen).seconds)
                    }
                }
                try await CLI.remove(workspace, [clone])
            }

            let ratio = Summary(devices).median / Summary(plain).median
            var targets = [Target(name: "clone with a tap NIC and an overlay disk vs plain clone", measured: Format.ratio(ratio) + " (\(Format.milliseconds(Summary(devices).median)) vs \(Format.milliseconds(Summary(plain).median)))", limit: "<= 1.3×", pass: ratio <= 1.3)]
            if otherVMTemplate != nil {
                let before = Summary(plain).median / Summary(otherPlain).median
                targets.append(Target(name: "plain clone now vs plain clone of --also-vmtemplate", measured: Format.ratio(before) + " (\(Format.milliseconds(Summary(plain).median)) vs \(Format.milliseconds(Summary(otherPlain).median)))", limit: "<= 1.05×", pass: before <= 1.05))
            }
            let results = Results(host: workspace.host, plain: Summary(plain), devices: Summary(devices), devicesSeen: Summary(devicesSeen), otherPlain: otherVMTemplate == nil ? nil : Summary(otherPlain), otherVMTemplate: otherVMTemplate,
                                  deviceAddDisk: Summary(addDisk), diskVisible: Summary(diskSeen), deviceAddNIC: Summary(addNIC), nicVisible: Summary(nicSeen), targets: targets)
            if common.json { return try printJSON(results) }
            let row = Summary.tableRow
            let h = results.host
            print("""
                \(h.date), \(h.cores) cores, Linux \(h.kernel), \(h.qemu), TCG, load \(h.loadAverage) -> \(HostFacts.loadAverage)

                \(Format.table(["", "runs", "median", "min", "max"], [
                    row("plain clone (CLI, until it returns)", results.plain),
                    row("clone --nic tap=...,netns=... --disk path=...,overlay=on", results.devices),
                    row("  the same with --wait-devices (until the guest sees both)", results.devicesSeen),
                ] + (results.otherPlain.map { [row("plain clone, --also-vmtemplate", $0)] } ?? []) + [
                    row("device add --disk (overlay), CLI until it returns", results.deviceAddDisk),
                    row("  then until the guest lists the disk", results.diskVisible),
                    row("device add --nic tap, CLI until it returns", results.deviceAddNIC),
                    row("  then until the guest lists the NIC", results.nicVisible),
                ]))

                \(targets.map(\.line).joined(separator: "\n"))
                """)
        }
    }

    private func shell(_ command: String) throws {
        let result = try ShortCommand.run("/bin/sh", ["-c", command])
        guard result.status == 0 else { throw BenchError("\(command) failed: \(result.stderr)") }
    }
}
