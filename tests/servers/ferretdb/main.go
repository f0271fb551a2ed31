// Command ferretdb runs an embedded FerretDB (MongoDB wire protocol) on its SQLite backend
// for the test suite.
//
// The upstream cmd/ferretdb refuses to start when built with `go install` because its
// generated version file is missing from the module; the embeddable package has no such check.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on (port 0 picks a free port)")
	dataDir := flag.String("data-dir", "", "directory holding the SQLite databases (created if missing)")
	readyFile := flag.String("ready-file", "", "write the MongoDB URI to this file once listening")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()

	if err := run(*listen, *dataDir, *readyFile, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "ferretdb: %s\n", err)
		os.Exit(1)
	}
}

func run(listen, dataDir, readyFile, logLevel string) error {
	if dataDir == "" {
		return fmt.Errorf("-data-dir is required")
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("bad -log-level: %w", err)
	}

	// Belt and braces: the embedded package already disables telemetry.
	os.Setenv("FERRETDB_TELEMETRY", "disable")
	os.Setenv("DO_NOT_TRACK", "1")

	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return err
	}
	if err = os.MkdirAll(dir, 0o700); err != nil {
		return err
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	// The SQLite handler wants a directory URI ending with a slash.
	db, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: listen},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: "file:" + strings.TrimSuffix(dir, "/") + "/",
	})
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	done := make(chan error, 1)
	go func() { done <- db.Run(ctx) }()

	// New has already bound the listener, so the address is known.
	uri := db.MongoDBURI()
	if readyFile != "" {
		tmp := readyFile + ".tmp"
		if err = os.WriteFile(tmp, []byte(uri+"\n"), 0o600); err != nil {
			return err
		}
		if err = os.Rename(tmp, readyFile); err != nil {
			return err
		}
	}
	logger.Warn("ferretdb ready", "uri", uri)

	return <-done
}
