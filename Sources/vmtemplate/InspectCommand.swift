import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "inspect", abstract: "Show one template or clone in full.", discussion: "Examples:\n  vmtemplate inspect busybox\n  vmtemplate inspect web-1 --json")

    @Argument(help: "A template name, or a clone ID (or unambiguous prefix) or name.", completion: NameCompletion.templatesAndClones)
    var reference: String

    @Flag(help: "Print one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    struct TemplateView: Encodable {
        var kind = "template"
        var template: TemplateManifest
        var clones: [String]
    }

    struct CloneInspection: Encodable {
        var kind = "clone"
        var clone: CloneView
        var record: CloneRecord
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            let records = store.clones().records
            if let name = try? EntityName(reference), store.templateExists(name) {
                let view = TemplateView(template: try store.template(named: name).manifest, clones: records.filter { $0.template == reference }.map(\.id))
                if json { return try Terminal.printJSON(view) }
                let manifest = view.template
                var rows: [[String]] = [
                    ["template", manifest.name], ["guest memory", ByteSize(bytes: manifest.machine.memoryBytes).description],
                    ["machine", manifest.machine.machineType], ["accelerator", manifest.machine.accelerator.rawValue],
                    ["hot-plug slots", String(manifest.machine.hotplugSlots)], ["guest setup", (manifest.guestClock ?? .none).rawValue],
                    ["ready when", (manifest.readyWhen ?? .marker).rawValue],
                    ["QEMU", "\(manifest.qemu.version) (\(manifest.qemu.path))"], ["created", ISO8601DateFormatter().string(from: manifest.createdAt)],
                    ["clones", view.clones.isEmpty ? "none" : view.clones.joined(separator: " ")],
                ]
                if let origin = manifest.origin {
                    rows.append(["pulled from", TerminalText.escape("\(origin.reference) (\(origin.digest))")])
                }
                for file in manifest.storedFiles {
                    rows.append(["file \(file.name)", "\(ByteSize(bytes: file.sizeBytes)) sha256 \(file.sha256)"])
                }
                for (index, disk) in manifest.machine.bootDisks.enumerated() {
                    rows.append(["boot disk \(index)", "\(disk.format.rawValue), \(disk.mode.rawValue)\(manifest.boot.disks.flatMap { $0.indices.contains(index) ? " from \(TerminalText.escape($0[index].path))" : nil } ?? "")"])
                }
                for command in manifest.guestCommands ?? [] {
                    rows.append(["guest command", TerminalText.escape(command.joined(separator: " "))])
                }
                print(TextTable.render(rows))
                return
            }
            let record = try store.findClone(reference)
            let view = CloneInspection(clone: await CloneLifecycle(store: store).status(of: record), record: record)
            if json { return try Terminal.printJSON(view) }
            let status = view.clone
            var rows: [[String]] = [
                ["id", record.id], ["name", record.name], ["template", record.template],
                ["state", status.state.rawValue], ["pid", record.qemu.map { String($0.pid) } ?? "-"],
                ["created", ISO8601DateFormatter().string(from: record.createdAt)],
                ["copy-on-write", status.cowBytes.map { ByteSize(bytes: $0).description } ?? "-"],
                ["QEMU private", status.privateBytes.map { ByteSize(bytes: $0).description } ?? "-"],
                ["cow limit", record.cowLimitBytes.map { ByteSize(bytes: $0).description } ?? "none"],
                ["vmgenid", record.vmgenid ?? "-"], ["clock", record.clock ?? "-"], ["from pool", record.fromPool == true ? "yes" : "no"],
                ["qmp socket", status.qmpSocket], ["control socket", status.controlSocket], ["serial log", status.serialLog],
            ]
            if let socket = status.agentSocket { rows.append(["agent socket", socket]) }
            if let setup = record.guestSetup { rows.append(["guest setup", "\(setup) (\(store.cloneLayout(record.id).guestSetupLog))"]) }
            if let enforcement = record.lastEnforcement {
                rows.append(["last enforcement", "\(enforcement.action.rawValue) at \(ISO8601DateFormatter().string(from: enforcement.time)) (\(ByteSize(bytes: enforcement.cowBytes)) over \(ByteSize(bytes: enforcement.limitBytes)))"])
            }
            for device in record.devices ?? [] { rows.append(["device", device.summary]) }
            print(TextTable.render(rows))
        }
    }
}
