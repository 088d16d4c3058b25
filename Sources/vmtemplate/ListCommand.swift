import ArgumentParser
import Foundation
import VMTemplateKit

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List templates (and clones).")

    @Flag(help: "Print one JSON object: {\"templates\": [...], \"clones\": [...]}.")
    var json = false

    @OptionGroup var store: StoreOptions

    struct TemplateRow: Encodable {
        var name: String
        var memoryBytes: UInt64
        var clones: Int
        var createdAt: Date
        var qemuVersion: String
        var machineType: String
        var accelerator: String

        enum CodingKeys: String, CodingKey {
            case name
            case memoryBytes = "memory_bytes"
            case clones
            case createdAt = "created_at"
            case qemuVersion = "qemu_version"
            case machineType = "machine_type"
            case accelerator
        }
    }

    struct Listing: Encodable {
        var templates: [TemplateRow]
        var clones: [String]
        var problems: [String]
    }

    func run() async throws {
        try await reportingErrors {
            let (manifests, problems) = try store.open().templates()
            let rows = manifests.map {
                TemplateRow(name: $0.name, memoryBytes: $0.machine.memoryBytes, clones: 0, createdAt: $0.createdAt, qemuVersion: $0.qemu.version, machineType: $0.machine.machineType, accelerator: $0.machine.accelerator.rawValue)
            }
            if json {
                try Terminal.printJSON(Listing(templates: rows, clones: [], problems: problems))
                return
            }
            for problem in problems { Terminal.note("warning: \(problem)") }
            let formatter = ISO8601DateFormatter()
            var table = [["TEMPLATE", "MEMORY", "CLONES", "MACHINE", "ACCEL", "CREATED"]]
            table += rows.map { [$0.name, ByteSize(bytes: $0.memoryBytes).description, String($0.clones), $0.machineType, $0.accelerator, formatter.string(from: $0.createdAt)] }
            print(TextTable.render(table))
        }
    }
}

/// Left-aligned columns separated by two spaces.
enum TextTable {
    static func render(_ rows: [[String]]) -> String {
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
