import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List templates (and clones).",
        discussion: "Examples:\n  vmtemplate list\n  vmtemplate list --json\n  vmtemplate list -q | xargs vmtemplate rm"
    )

    @Flag(help: "Print one JSON object: {\"templates\": [...], \"clones\": [...]}.")
    var json = false

    @Flag(name: .shortAndLong, help: "Print the clones' IDs only, one per line (pool members left out).")
    var quiet = false

    @OptionGroup var store: StoreOptions

    struct Listing: Encodable {
        var templates: [TemplateView]
        var clones: [CloneView]
        var summary: MemorySummary
        var problems: [String]
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            if quiet {
                for record in store.clones().records where record.state != .pooled && record.state != .warming { print(record.id) }
                return
            }
            let (templates, templateProblems) = store.templates()
            let manifests = templates.map(\.manifest)
            let listing = store.listClones()
            let records = listing.records
            let cloneProblems = listing.problems + (listing.notYours.isEmpty ? [] : ["\(listing.notYours.count) clones here are another user's (not yours): \(listing.notYours.joined(separator: ", "))."])
            let clones = await CloneLifecycle(store: store).statuses(of: records)
            let problems = templateProblems + cloneProblems
            let rows = templates.map { template in
                TemplateView(template, clones: clones.filter { $0.template == template.manifest.name && $0.state != .exited }.count, missingFiles: store.missingFiles(of: template))
            }
            if json {
                try Terminal.printJSON(Listing(templates: rows, clones: clones, summary: MemorySummary(templates: manifests, clones: clones), problems: problems))
                return
            }
            for problem in problems { Terminal.note("warning: \(problem)") }
            let formatter = ISO8601DateFormatter()
            var table = [["TEMPLATE", "MEMORY", "CLONES", "MACHINE", "ACCEL", "CREATED", "FILES", "FROM"]]
            table += rows.map {
                [$0.name, ByteSize(bytes: $0.memoryBytes).description, String($0.clones), $0.machineType, $0.accelerator, formatter.string(from: $0.createdAt),
                 $0.missingFiles.isEmpty ? "ok" : "MISSING \($0.missingFiles.joined(separator: ","))",
                 // The manifest digest, short: what `inspect` shows in full with the reference.
                 $0.origin.map { String($0.digest.prefix(19)) } ?? "here"]
            }
            print(TextTable.render(table))
            for row in rows where !row.missingFiles.isEmpty {
                Terminal.note("warning: template '\(row.name)' is missing \(row.missingFiles.joined(separator: " and ")): it cannot be cloned; remove it (vmtemplate rm-template \(row.name)) and create it again.")
            }
            if !clones.isEmpty {
                print("")
                var cloneTable = [["CLONE", "NAME", "TEMPLATE", "STATE", "UPTIME", "COW", "LIMIT", "OVER LIMIT", "LAST ACTION", "QEMU PRIVATE"]]
                cloneTable += clones.map {
                    [$0.id, $0.name, $0.template, $0.state.rawValue + ($0.pausedBy.map { " (\($0.rawValue))" } ?? ""), Self.uptime($0.uptimeSeconds),
                     $0.cowBytes.map { ByteSize(bytes: $0).description } ?? "-",
                     $0.cowLimitBytes.map { ByteSize(bytes: $0).description } ?? "-",
                     $0.overLimitAction?.rawValue ?? "-",
                     $0.lastEnforcement.map(Self.describe) ?? "-",
                     $0.privateBytes.map { ByteSize(bytes: $0).description } ?? "-"]
                }
                print(TextTable.render(cloneTable))
                let summary = MemorySummary(templates: manifests, clones: clones)
                let ratio = summary.inUseBytes > 0 ? Double(summary.fullCopyBytes) / Double(summary.inUseBytes) : 0
                print("")
                print("\(summary.running) running, \(summary.paused) paused, \(summary.exited) exited: \(ByteSize(bytes: summary.inUseBytes)) in use (copy-on-write \(ByteSize(bytes: summary.cowBytes)), QEMU \(ByteSize(bytes: summary.privateBytes)), template pages \(ByteSize(bytes: summary.templateResidentBytes))) versus \(ByteSize(bytes: summary.fullCopyBytes)) as full copies (\(String(format: "%.1f", ratio))x)")
            }
        }
    }
}

extension List {
    /// "paused 12:03:04Z" or "kill failed 12:03:04Z".
    static func describe(_ enforcement: Enforcement) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withTime, .withColonSeparatorInTime, .withTimeZone]
        let what = enforcement.action == .pause ? "paused" : "killed"
        return "\(enforcement.done ? what : "\(enforcement.action.rawValue) failed") \(formatter.string(from: enforcement.time))"
    }

    static func uptime(_ seconds: Double) -> String {
        let whole = Int(seconds)
        if whole < 60 { return "\(whole)s" }
        if whole < 3600 { return "\(whole / 60)m\(whole % 60)s" }
        return "\(whole / 3600)h\((whole % 3600) / 60)m"
    }
}

/// Left-aligned columns separated by two spaces.
enum TextTable {
    static func render(_ rows: [[String]]) -> String {
        // Cells carry names and text from records: escaped before anything is measured or printed.
        let rows = rows.map { $0.map(TerminalText.escape) }
        guard let columns = rows.map(\.count).max() else { return "" }
        var widths = Array(repeating: 0, count: columns)
        for row in rows {
            for (index, cell) in row.enumerated() { widths[index] = max(widths[index], cell.count) }
        }
        return rows.map { row in
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
